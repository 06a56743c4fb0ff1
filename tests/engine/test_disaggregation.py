"""Prefill-role and decode-role engines in one process on k2-tiny, KV copied block by block:
same greedy tokens as a colocated engine, and every block back in the pool on every path."""

from __future__ import annotations

import pytest
import torch

from k2ray.engine.config import EngineConfig
from k2ray.engine.kv.kv_transfer import KVReservation, PrefillResult, plan_kv_transfer
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.outputs import RequestOutput
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_KV_BLOCKS = 128
GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=2)
# The decode engine must see the first token in the penalties and continue the seeded stream after it.
PENALIZED = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.5, frequency_penalty=0.5)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10)


@pytest.fixture(scope="module")
def engines() -> dict[str, LLMEngine]:
    def make(role: str) -> LLMEngine:
        return LLMEngine(EngineConfig(model=str(tiny_checkpoint_dir()), role=role, block_size=BLOCK_SIZE,
                                      num_kv_blocks=NUM_KV_BLOCKS, max_num_batched_tokens=64, max_model_len=256))
    return {role: make(role) for role in ("both", "prefill", "decode")}


@pytest.fixture
def pd(engines: dict[str, LLMEngine], track_kv) -> tuple[LLMEngine, LLMEngine]:
    for engine in engines.values():
        track_kv(engine.kv_cache_manager)
    return engines["prefill"], engines["decode"]


def tokens(seed: int, num: int) -> list[int]:
    return torch.randint(0, 512, (num,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: LLMEngine) -> dict[str, RequestOutput]:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def prefill(engine: LLMEngine, prompts: dict[str, list[int]],
            params: SamplingParams | dict[str, SamplingParams] = GREEDY) -> dict[str, PrefillResult]:
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params[request_id] if isinstance(params, dict) else params)
    outputs = run(engine)
    assert all(output.outputs[0].finish_reason == "length" for output in outputs.values())
    return {request_id: output.prefill_result for request_id, output in outputs.items()}


def transfer(prefill_engine: LLMEngine, decode_engine: LLMEngine, result: PrefillResult, prompt: list[int],
             params: SamplingParams = GREEDY, first_at_reserve: bool = True) -> KVReservation:
    first = result.first_token_id if first_at_reserve else None
    reservation = decode_engine.add_prefilled_request(result.request_id, prompt, first, params)
    plan = plan_kv_transfer(result, reservation)
    kv = prefill_engine.model_runner.read_kv_blocks(plan.src_block_ids)
    assert kv.is_contiguous()
    decode_engine.model_runner.write_kv_blocks(plan.dst_block_ids, kv)
    return reservation


def test_disaggregated_greedy_tokens_match_colocated_with_prefix_hits_on_both_sides(engines, pd) -> None:
    prefill_engine, decode_engine = pd
    for engine in engines.values():
        engine.kv_cache_manager.reset_prefix_cache()
    shared, local = tokens(100, 20), tokens(101, 16)
    prompts = {f"r{i}": tokens(i, n) for i, n in enumerate([1, 3, 4, 9, 17, 33, 70])}
    prompts |= {"shared_a": shared + tokens(102, 5), "shared_b": shared + tokens(103, 9),
                "local_hit": local + tokens(104, 7)}
    params = {request_id: [GREEDY, PENALIZED, SEEDED][i % 3] for i, request_id in enumerate(prompts)}
    for request_id, prompt in prompts.items():
        engines["both"].add_request(request_id, prompt, params[request_id])
    colocated = run(engines["both"])

    # Decode side computes `local` itself first, so its prefix cache serves 4 blocks of local_hit.
    decode_engine.add_request("warm", local + tokens(105, 3), SamplingParams(temperature=0, max_tokens=2))
    run(decode_engine)
    results = prefill(prefill_engine, {"shared_a": prompts["shared_a"]}, params)
    results |= prefill(prefill_engine, {k: p for k, p in prompts.items() if k != "shared_a"}, params)
    assert results["shared_b"].num_cached_tokens == len(shared)
    assert results["r0"].num_cached_tokens == 0

    # shared_a lands (and is cached) on the decode side before shared_b is reserved.
    decode_hit_blocks = {"local_hit": len(local) // BLOCK_SIZE, "shared_b": len(shared) // BLOCK_SIZE}
    assert list(results)[0] == "shared_a"
    for index, (request_id, result) in enumerate(results.items()):
        reservation = transfer(prefill_engine, decode_engine, result, prompts[request_id], params[request_id],
                               first_at_reserve=index % 2 == 0)
        assert reservation.num_computed_blocks == decode_hit_blocks.get(request_id, 0), request_id
        assert decode_engine.commit_prefilled(request_id, result)
        assert prefill_engine.release_prefilled(request_id)
        assert not prefill_engine.release_prefilled(request_id)
    decoded = run(decode_engine)

    for request_id, expected in colocated.items():
        got = decoded[request_id]
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids, request_id
        assert got.outputs[0].finish_reason == "length"
        assert got.num_cached_tokens == results[request_id].num_cached_tokens
        if params[request_id] is not GREEDY:
            continue
        got_lps = [{t: lp.logprob for t, lp in step.items()} for step in got.outputs[0].logprobs]
        want_lps = [{t: lp.logprob for t, lp in step.items()} for step in expected.outputs[0].logprobs]
        assert [sorted(s) for s in got_lps] == [sorted(s) for s in want_lps]
        for got_step, want_step in zip(got_lps, want_lps, strict=True):
            assert got_step == pytest.approx(want_step, abs=1e-4)
    assert prefill_engine.get_stats().num_free_blocks == NUM_KV_BLOCKS


def test_prefill_side_frees_blocks_on_abort_at_every_stage(pd) -> None:
    prefill_engine, _ = pd
    prefill_engine.add_request("waiting", tokens(1, 9), GREEDY)
    prefill_engine.abort_requests(["waiting"])
    assert prefill_engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS

    prefill_engine.add_request("chunked", tokens(2, 150), GREEDY)  # 64-token budget: 3 chunks
    assert prefill_engine.step() == []
    assert prefill_engine.kv_cache_manager.num_free_blocks < NUM_KV_BLOCKS
    prefill_engine.abort_requests(["chunked"])
    assert prefill_engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS

    result = prefill(prefill_engine, {"done": tokens(3, 10)})["done"]
    assert len(result.block_ids) == 3 and result.num_tokens == 10
    assert prefill_engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS - 3
    assert not prefill_engine.has_unfinished_requests()
    aborted = prefill_engine.abort_requests(["done"])
    assert [r.request_id for r in aborted] == ["done"]
    assert not prefill_engine.release_prefilled("done")


def test_decode_side_frees_blocks_on_abort_before_commit_after_commit_and_mid_decode(pd) -> None:
    prefill_engine, decode_engine = pd
    prompts = {stage: tokens(10 + i, 13) for i, stage in enumerate(["reserved", "committed", "decoding"])}
    results = prefill(prefill_engine, prompts)
    for request_id, result in results.items():
        transfer(prefill_engine, decode_engine, result, prompts[request_id])
        assert prefill_engine.release_prefilled(request_id)
    assert not decode_engine.has_unfinished_requests()  # a reservation takes no steps
    assert decode_engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS - 3 * 4

    decode_engine.abort_requests(["reserved"])
    assert not decode_engine.commit_prefilled("reserved", results["reserved"])
    assert decode_engine.commit_prefilled("committed", results["committed"])
    decode_engine.abort_requests(["committed"])
    assert decode_engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS - 4

    assert decode_engine.commit_prefilled("decoding")  # first token given at reservation
    for _ in range(4):
        decode_engine.step()
    assert decode_engine.scheduler.requests["decoding"].num_cached_tokens == 0
    assert decode_engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS - 5  # 13 + 4 tokens
    decode_engine.abort_requests(["decoding"])
    assert not decode_engine.has_unfinished_requests()


def test_first_token_can_finish_the_request_at_commit(pd) -> None:
    prefill_engine, decode_engine = pd
    prompt = tokens(20, 11)
    first = prefill(prefill_engine, {"probe": prompt})["probe"].first_token_id
    prefill_engine.release_prefilled("probe")
    cases = {"stop": SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first]),
             "length": SamplingParams(temperature=0, max_tokens=1)}
    for reason, params in cases.items():
        result = prefill(prefill_engine, {reason: prompt}, params)[reason]
        transfer(prefill_engine, decode_engine, result, prompt, params)
        assert decode_engine.commit_prefilled(reason, result)
        prefill_engine.release_prefilled(reason)
        assert decode_engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS
        (output,) = decode_engine.step()
        assert output.finished and output.outputs[0].finish_reason == reason
        assert output.outputs[0].token_ids == [first]
    assert not decode_engine.has_unfinished_requests()


def test_reservation_is_none_when_blocks_run_out_and_changes_nothing(pd) -> None:
    _, decode_engine = pd
    params = SamplingParams(temperature=0, max_tokens=2)
    big = NUM_KV_BLOCKS * BLOCK_SIZE // 2 - BLOCK_SIZE  # 63 blocks each, within max_model_len
    assert decode_engine.add_prefilled_request("a", tokens(30, big), 1, params) is not None
    assert decode_engine.add_prefilled_request("b", tokens(31, big), 1, params) is not None
    free = decode_engine.kv_cache_manager.num_free_blocks
    assert decode_engine.add_prefilled_request("c", tokens(32, big), 1, params) is None
    assert decode_engine.kv_cache_manager.num_free_blocks == free
    with pytest.raises(ValueError, match="already in use"):
        decode_engine.add_prefilled_request("a", tokens(30, 8), 1, params)
    decode_engine.abort_requests(["a", "b", "c"])


def test_roles_guard_their_entry_points(pd) -> None:
    prefill_engine, decode_engine = pd
    with pytest.raises(ValueError, match="prefill-role"):
        prefill_engine.add_prefilled_request("x", [1, 2], 3, GREEDY)
    decode_engine.add_prefilled_request("x", [1, 2, 3], None, GREEDY)
    with pytest.raises(ValueError, match="first token"):
        decode_engine.commit_prefilled("x")
    with pytest.raises(ValueError, match="first token id must be in"):
        decode_engine.commit_prefilled("x", PrefillResult("x", 10**6, None, 0, (0,), 3))
    assert not decode_engine.release_prefilled("x")
    decode_engine.abort_requests(["x"])
    decode_engine.add_request("live", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        decode_engine.add_prefilled_request("live", [1, 2, 3], 4, GREEDY)
    assert len(run(decode_engine)["live"].outputs[0].token_ids) == 3  # the live request kept its state


def test_read_write_kv_blocks_round_trip_and_checks(engines, pd) -> None:
    runner = engines["decode"].model_runner
    layout = runner.kv_layout
    kv = torch.randn(layout.shape(2), dtype=layout.dtype)
    runner.write_kv_blocks([5, 9], kv)
    assert torch.equal(runner.read_kv_blocks([5, 9]), kv)
    assert torch.equal(runner.read_kv_blocks([9]), kv[:, 1:])
    assert runner.read_kv_blocks([]).shape == layout.shape(0)
    with pytest.raises(ValueError, match="must be"):
        runner.write_kv_blocks([5], kv)
    with pytest.raises(ValueError, match="must be"):
        runner.write_kv_blocks([5, 9], kv.double())
    with pytest.raises(ValueError, match="distinct"):
        runner.write_kv_blocks([5, 5], kv)
    with pytest.raises(ValueError, match="block ids must be in"):
        runner.read_kv_blocks([NUM_KV_BLOCKS])
    engines["decode"].kv_cache_manager.reset_prefix_cache()  # the random rows must never be hit


def test_plan_kv_transfer_pairs_only_blocks_that_need_data() -> None:
    result = PrefillResult("r", 7, None, 0, (3, 4, 5), 10)
    plan = plan_kv_transfer(result, KVReservation("r", (8, 1, 2), num_computed_blocks=1))
    assert (plan.src_block_ids, plan.dst_block_ids, plan.num_blocks) == ((4, 5), (1, 2), 2)
    with pytest.raises(ValueError, match="does not match"):
        plan_kv_transfer(result, KVReservation("other", (8, 1, 2), 0))
    with pytest.raises(ValueError, match="disagree"):
        plan_kv_transfer(result, KVReservation("r", (8, 1), 0))


def test_all_request_ids_include_parked_requests_so_shutdown_frees_them(pd) -> None:
    prefill_engine, decode_engine = pd
    prefill(prefill_engine, {"held": tokens(4, 10)})
    decode_engine.add_prefilled_request("reserved", tokens(5, 10), None, GREEDY)
    for engine in (prefill_engine, decode_engine):
        assert engine.scheduler.all_request_ids() == [*engine.scheduler.requests, *engine.scheduler.parked]
        assert engine.scheduler.all_request_ids()
        engine.abort_requests(engine.scheduler.all_request_ids())
        assert engine.kv_cache_manager.num_free_blocks == NUM_KV_BLOCKS
