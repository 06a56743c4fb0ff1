"""A step that raises fails requests, never the prefix cache or the engine: nothing computed by a
failed step is ever served from the cache, and a failure outside the forward fails parked requests too."""

from __future__ import annotations

import pytest

from k2ray.engine.config import EngineConfig
from k2ray.engine.errors import EngineStepError
from k2ray.engine.llm_engine import LLMEngine
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_KV_BLOCKS = 64
# 13 tokens: three full blocks a later identical prompt could take from the prefix cache.
PROMPT = [11, 42, 7, 99, 3, 250, 18, 64, 5, 77, 120, 31, 9]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


class InjectedFailure(RuntimeError):
    pass


def make_engine(track_kv, **overrides) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint_dir()), block_size=BLOCK_SIZE,
                                    num_kv_blocks=NUM_KV_BLOCKS, max_model_len=128, **overrides))
    track_kv(engine.kv_cache_manager)
    return engine


def fail_once(obj, name: str) -> None:
    """Make `obj.name` raise on its next call only (an instance attribute shadowing the method)."""
    original = getattr(obj, name)

    def failing(*args, **kwargs):
        setattr(obj, name, original)
        raise InjectedFailure("injected")

    setattr(obj, name, failing)


def run(engine: LLMEngine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def test_failed_forward_leaves_nothing_in_the_prefix_cache(track_kv) -> None:
    fresh = make_engine(track_kv)
    fresh.add_request("fresh", PROMPT, GREEDY)
    expected = run(fresh)["fresh"]

    engine = make_engine(track_kv)
    engine.add_request("doomed", PROMPT, GREEDY)
    fail_once(engine.model_runner, "execute_model")
    with pytest.raises(EngineStepError) as failure:
        engine.step()
    assert failure.value.request_ids == ["doomed"]
    assert isinstance(failure.value.cause, InjectedFailure)
    assert engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS

    engine.add_request("again", PROMPT, GREEDY)
    again = run(engine)["again"]
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == expected.outputs[0].token_ids
    # Once a step succeeds, its blocks are cached as before.
    engine.add_request("third", PROMPT, GREEDY)
    assert run(engine)["third"].num_cached_tokens == 12


def test_failed_forward_fails_only_the_requests_it_scheduled(track_kv) -> None:
    engine = make_engine(track_kv, max_num_seqs=1)
    engine.add_request("scheduled", PROMPT, GREEDY)
    engine.add_request("queued", PROMPT[:5], GREEDY)
    fail_once(engine.model_runner, "execute_model")
    with pytest.raises(EngineStepError) as failure:
        engine.step()
    assert failure.value.request_ids == ["scheduled"]
    finished = run(engine)
    assert list(finished) == ["queued"] and finished["queued"].outputs[0].finish_reason == "length"


def test_failure_outside_the_forward_fails_every_request_parked_ones_included(track_kv) -> None:
    engine = make_engine(track_kv, role="prefill")
    engine.add_request("parked", PROMPT, GREEDY)
    assert run(engine)["parked"].prefill_result is not None
    assert engine.kv_cache_manager.num_free_blocks < NUM_KV_BLOCKS  # held for the decode side
    engine.add_request("waiting", PROMPT[:6], GREEDY)
    fail_once(engine.scheduler, "schedule")
    with pytest.raises(EngineStepError) as failure:
        engine.step()
    assert sorted(failure.value.request_ids) == ["parked", "waiting"]
    assert isinstance(failure.value.cause, InjectedFailure)
    assert not engine.has_unfinished_requests()
    assert not engine.release_prefilled("parked")
    assert engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS
