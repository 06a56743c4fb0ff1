"""Parked requests hold KV blocks on a lease: a prefill whose reader never comes and a decode
reservation whose KV never lands fail once `kv_lease_timeout_s` has passed, and their blocks come back."""

from __future__ import annotations

import pytest

from k2ray.engine.config import EngineConfig
from k2ray.engine.errors import EngineStepError, KVLeaseExpired
from k2ray.engine.llm_engine import LLMEngine
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_KV_BLOCKS = 64
LEASE_S = 30.0
PROMPT = [11, 42, 7, 99, 3, 250, 18, 64, 5, 77]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_engine(track_kv, clock: FakeClock, role: str) -> LLMEngine:
    config = EngineConfig(model=str(tiny_checkpoint_dir()), role=role, block_size=BLOCK_SIZE,
                          num_kv_blocks=NUM_KV_BLOCKS, max_model_len=128, kv_lease_timeout_s=LEASE_S)
    engine = LLMEngine(config, clock=clock)
    track_kv(engine.kv_cache_manager)
    return engine


def prefill(engine: LLMEngine, request_id: str, prompt: list[int]) -> None:
    engine.add_request(request_id, prompt, GREEDY)
    while engine.has_unfinished_requests():
        engine.step()


def test_prefilled_blocks_are_freed_when_the_lease_ends(track_kv) -> None:
    clock = FakeClock()
    engine = make_engine(track_kv, clock, "prefill")
    prefill(engine, "early", PROMPT)
    clock.now += LEASE_S / 2
    prefill(engine, "late", [t + 1 for t in PROMPT])
    held = NUM_KV_BLOCKS - engine.kv_cache_manager.num_free_blocks
    assert held == 6
    clock.now += LEASE_S / 2  # "early"'s lease is over, "late"'s is not
    with pytest.raises(EngineStepError) as failure:
        engine.step()
    assert failure.value.request_ids == ["early"]
    assert isinstance(failure.value.cause, KVLeaseExpired)
    assert engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS - held // 2
    assert not engine.release_prefilled("early")
    assert engine.step() == []  # the engine serves on
    clock.now += LEASE_S
    assert engine.expire_leases() == ["late"]  # what an idle loop calls
    assert engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS
    assert engine.scheduler.num_expired_leases == 2


def test_decode_reservation_is_freed_when_its_kv_never_lands(track_kv) -> None:
    clock = FakeClock()
    engine = make_engine(track_kv, clock, "decode")
    reservation = engine.add_prefilled_request("reserved", PROMPT, 5, GREEDY)
    assert reservation is not None and len(reservation.block_ids) == 3
    engine.add_request("local", PROMPT[:4], GREEDY)
    clock.now += LEASE_S - 1
    engine.step()
    assert engine.kv_cache_manager.num_free_blocks < NUM_KV_BLOCKS - 3
    clock.now += 1
    with pytest.raises(EngineStepError) as failure:
        engine.step()
    assert failure.value.request_ids == ["reserved"]
    assert not engine.commit_prefilled("reserved")
    finished = {}
    while engine.has_unfinished_requests():  # the local request is untouched by the expiry
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert list(finished) == ["local"] and len(finished["local"].outputs[0].token_ids) == GREEDY.max_tokens


def test_lease_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="kv_lease_timeout_s"):
        EngineConfig(model="unused", kv_lease_timeout_s=0)
