"""Two real engines on k2-tiny, prefill in a spawned process and decode here, latent KV moved over a
gloo KV pair: bit-exact blocks, only the missing ones on the wire, colocated greedy tokens, and
clean ends when the prefill process dies mid-transfer or the decode side aborts mid-receive."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from kv_prefill_worker import GATE_OPEN, GATE_PAUSE, WorkerArgs
from prefill_process import CALL_TIMEOUT_S, PrefillProcess

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.dist.kv_pair_group import KVPeerUnavailable, PairSpec
from k2ray.dist.kv_receiver import KVReceiver
from k2ray.dist.kv_wire import KVTransferCancelled, KVTransferMeta, block_bytes
from k2ray.engine.config import EngineConfig
from k2ray.engine.llm_engine import LLMEngine
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_KV_BLOCKS = 128
GREEDY = SamplingParams(temperature=0, max_tokens=8)
TIMEOUT_S = 10.0
BLOCKS_PER_CHUNK = 2
POLL_S = 0.02
LONG_PROMPT = 37  # 10 blocks: 5 chunks


def engine_config(role: str) -> EngineConfig:
    return EngineConfig(model=str(tiny_checkpoint_dir()), role=role, block_size=BLOCK_SIZE,
                        num_kv_blocks=NUM_KV_BLOCKS, max_num_batched_tokens=64, max_model_len=256)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tokens(seed: int, num: int) -> list[int]:
    return torch.randint(0, 512, (num,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: LLMEngine) -> dict[str, list[int]]:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    return finished


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


class Side:
    """The decode engine and its receiver here; the prefill engine's process over there."""

    def __init__(self) -> None:
        self.decode = LLMEngine(engine_config("decode"))
        layout = self.decode.model_runner.kv_layout
        self.transfer = KVTransferConfig(TIMEOUT_S, BLOCKS_PER_CHUNK * block_bytes(layout))
        port = free_port()
        self.receiver = KVReceiver(self.decode.model_runner, PairSpec("127.0.0.1", port, "pd0", 0), self.transfer)
        self.prefill_spec = PairSpec("127.0.0.1", port, "pd0", 1)
        self.prefill = self.start_prefill()

    def start_prefill(self) -> PrefillProcess:
        return PrefillProcess(WorkerArgs(engine_config("prefill"), self.prefill_spec, self.transfer))

    def begin(self, request_id: str, prompt: list[int]):
        """Reserve on decode, expect the transfer, prefill over there and start its send."""
        reservation = self.decode.add_prefilled_request(request_id, prompt, None, GREEDY)
        meta = KVTransferMeta.from_reservation(reservation, self.decode.model_runner.kv_layout)
        future = self.receiver.recv(meta, reservation.block_ids_to_fill)
        result = self.prefill.call("prefill", request_id, prompt, GREEDY)
        src_block_ids = meta.src_block_ids(result)
        assert self.prefill.call("send", meta, src_block_ids) == "queued"
        return reservation, result, src_block_ids, future

    def assert_prefill_blocks_free(self) -> None:
        num_free, num_total = self.prefill.call("free_blocks")
        assert num_free == num_total

    def close(self) -> None:
        self.prefill.close()
        self.receiver.close()


@pytest.fixture(scope="module")
def side():
    side = Side()
    yield side
    side.close()


@pytest.fixture
def pd(side: Side) -> Side:
    """Every test ends with all blocks free on both sides."""
    yield side
    pool = side.decode.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks and all(block.ref_cnt == 0 for block in pool.blocks)
    assert not side.decode.kv_cache_manager.req_to_blocks
    side.assert_prefill_blocks_free()


def test_latent_kv_lands_bit_for_bit_only_missing_blocks_travel_and_greedy_matches_colocated(pd) -> None:
    local = tokens(1, 16)
    prompts = {"cold": tokens(2, LONG_PROMPT), "decode_hit": local + tokens(3, 9)}
    colocated = LLMEngine(engine_config("both"))
    for request_id, prompt in prompts.items():
        colocated.add_request(request_id, prompt, GREEDY)
    expected = run(colocated)
    pd.decode.add_request("warm", local + tokens(4, 2), SamplingParams(temperature=0, max_tokens=2))
    run(pd.decode)

    for request_id, prompt in prompts.items():
        reservation, result, src_block_ids, future = pd.begin(request_id, prompt)
        stats = future.result(TIMEOUT_S * 2)
        sent = pd.prefill.call("sent", request_id)
        num_prompt_blocks = -(-len(prompt) // BLOCK_SIZE)
        num_hit = len(local) // BLOCK_SIZE if request_id == "decode_hit" else 0
        assert reservation.num_computed_blocks == num_hit
        assert stats.num_blocks == sent.num_blocks == num_prompt_blocks - num_hit
        assert stats.num_bytes == sent.num_bytes == stats.num_blocks * block_bytes(pd.receiver.layout)
        got = pd.decode.model_runner.read_kv_blocks(reservation.block_ids_to_fill)
        assert torch.equal(got, pd.prefill.call("read", src_block_ids))
        into = torch.empty_like(got)
        assert pd.decode.model_runner.read_kv_blocks(reservation.block_ids_to_fill, out=into) is into
        assert torch.equal(into, got)
        assert pd.decode.commit_prefilled(request_id, result)
        assert pd.prefill.call("release", request_id)
    assert run(pd.decode) == expected
    with pytest.raises(ValueError, match="out must be"):
        pd.decode.model_runner.read_kv_blocks([0, 1], out=torch.empty(pd.receiver.layout.shape(1)))


def test_abort_mid_receive_frees_blocks_and_no_late_write_lands(pd) -> None:
    builds = pd.receiver.group.num_builds
    drained = pd.receiver.num_drained
    pd.prefill.set_gate(GATE_PAUSE, after_reads=1)  # the first chunk goes, the rest waits
    prompt = tokens(5, LONG_PROMPT)
    reservation, _, src_block_ids, future = pd.begin("aborted", prompt)
    first_chunk = pd.prefill.call("read", src_block_ids[:BLOCKS_PER_CHUNK])
    dst_first = reservation.block_ids_to_fill[:BLOCKS_PER_CHUNK]
    wait_until(lambda: torch.equal(pd.decode.model_runner.read_kv_blocks(dst_first), first_chunk), "chunk 1")

    assert pd.receiver.cancel("aborted")
    with pytest.raises(KVTransferCancelled):
        future.result(0)
    pd.decode.abort_requests(["aborted"])
    assert pd.decode.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS
    snapshot = pd.decode.model_runner.read_kv_blocks(range(NUM_KV_BLOCKS))
    pd.prefill.set_gate(GATE_OPEN)
    pd.prefill.release.set()
    assert pd.prefill.call("sent", "aborted").num_blocks == len(src_block_ids)
    assert pd.prefill.call("release", "aborted")
    wait_until(lambda: pd.receiver.num_drained == drained + 1, "the rest drained")
    assert torch.equal(pd.decode.model_runner.read_kv_blocks(range(NUM_KV_BLOCKS)), snapshot)

    # The pair stayed in step: the next transfer uses it as it is.
    reservation, result, src_block_ids, future = pd.begin("after_abort", tokens(6, 13))
    assert future.result(TIMEOUT_S * 2).num_blocks == len(src_block_ids)
    assert pd.prefill.call("sent", "after_abort").num_blocks == len(src_block_ids)
    assert torch.equal(pd.decode.model_runner.read_kv_blocks(reservation.block_ids_to_fill),
                       pd.prefill.call("read", src_block_ids))
    pd.decode.abort_requests(["after_abort"])
    pd.prefill.call("release", "after_abort")
    assert pd.receiver.group.num_builds == builds


def test_prefill_killed_mid_transfer_fails_the_receive_in_time_and_the_pair_rebuilds(pd) -> None:
    builds = pd.receiver.group.num_builds
    pd.prefill.set_gate(GATE_PAUSE, after_reads=1)
    reservation, _, src_block_ids, future = pd.begin("killed", tokens(7, LONG_PROMPT))
    first_chunk = pd.prefill.call("read", src_block_ids[:BLOCKS_PER_CHUNK])
    dst_first = reservation.block_ids_to_fill[:BLOCKS_PER_CHUNK]
    wait_until(lambda: torch.equal(pd.decode.model_runner.read_kv_blocks(dst_first), first_chunk), "chunk 1")
    pd.prefill.process.kill()
    assert isinstance(future.exception(TIMEOUT_S), KVPeerUnavailable)
    pd.decode.abort_requests(["killed"])
    assert pd.decode.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS

    pd.prefill = pd.start_prefill()
    prompt = tokens(8, 21)
    reservation, result, src_block_ids, future = pd.begin("after_kill", prompt)
    assert future.result(TIMEOUT_S * 2).num_blocks == len(src_block_ids)
    assert torch.equal(pd.decode.model_runner.read_kv_blocks(reservation.block_ids_to_fill),
                       pd.prefill.call("read", src_block_ids))
    assert pd.decode.commit_prefilled("after_kill", result)
    assert pd.prefill.call("release", "after_kill")
    run(pd.decode)
    assert pd.receiver.group.num_builds == builds + 1
