from __future__ import annotations

import pytest

from k2ray.engine.config import DEFAULT_DECODE_RESERVED_SHARE, EngineConfig
from k2ray.engine.kv.kv_cache_manager import KVCacheManager
from k2ray.engine.outputs import ModelRunnerOutput, SchedulerOutput
from k2ray.engine.request import RequestStatus
from k2ray.engine.scheduler import RequestRejected, Scheduler
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4
EOS = 99


def make_scheduler(track_kv, num_blocks: int = 16, budget: int = 32, max_num_seqs: int = 8,
                   max_model_len: int = 64, caching: bool = True,
                   decode_share: float = DEFAULT_DECODE_RESERVED_SHARE) -> Scheduler:
    manager = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=caching)
    track_kv(manager)
    return Scheduler(manager, max_num_seqs, budget, max_model_len, decode_reserved_share=decode_share)


def add(scheduler: Scheduler, request_id: str, prompt: list[int], **params) -> None:
    request = scheduler.make_request(request_id, prompt, SamplingParams(**params), frozenset({EOS}))
    scheduler.add_request(request)


def step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedule, then pretend the model sampled `token` for every sampled sequence."""
    out = scheduler.schedule()
    sampled = {seq.request_id: token for seq in out.scheduled if seq.sample}
    scheduler.update_from_output(out, ModelRunnerOutput(sampled, {}))
    return out


def test_decodes_first_then_chunked_prefill_under_budget(track_kv) -> None:
    scheduler = make_scheduler(track_kv, budget=8)
    add(scheduler, "a", [1, 2, 3])
    out = step(scheduler)
    assert [(s.request_id, len(s.token_ids), s.sample) for s in out.scheduled] == [("a", 3, True)]
    add(scheduler, "b", list(range(10, 22)))  # 12 tokens
    out = step(scheduler)
    assert [(s.request_id, s.num_computed_tokens, len(s.token_ids), s.sample) for s in out.scheduled] == \
        [("a", 3, 1, True), ("b", 0, 7, False)]
    assert out.scheduled[1].block_ids == [1, 2]
    out = step(scheduler)
    assert [(s.request_id, s.num_computed_tokens, len(s.token_ids), s.sample) for s in out.scheduled] == \
        [("a", 4, 1, True), ("b", 7, 5, True)]
    assert out.num_scheduled_tokens == 6
    scheduler.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)


def test_new_requests_sent_once_and_finished_ids_reported(track_kv) -> None:
    scheduler = make_scheduler(track_kv)
    add(scheduler, "a", [1, 2], max_tokens=2)
    out = step(scheduler)
    assert [r.request_id for r in out.new_requests] == ["a"]
    out = step(scheduler)
    assert out.new_requests == [] and not scheduler.requests
    assert step(scheduler).finished_request_ids == frozenset({"a"})


def test_max_num_seqs(track_kv) -> None:
    scheduler = make_scheduler(track_kv, max_num_seqs=2)
    for i in range(3):
        add(scheduler, f"r{i}", [1, 2, 3])
    out = step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    scheduler.finish_requests(["r0"], RequestStatus.FINISHED_ABORTED)
    out = step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["r1", "r2"]
    scheduler.finish_requests(["r1", "r2"], RequestStatus.FINISHED_ABORTED)


def test_preempts_youngest_and_recomputes(track_kv) -> None:
    scheduler = make_scheduler(track_kv, num_blocks=3, caching=False)
    add(scheduler, "old", [1, 2, 3], max_tokens=6)
    add(scheduler, "young", [4, 5, 6], max_tokens=6)
    step(scheduler)
    step(scheduler)
    step(scheduler)  # both at 4 computed + 1 new -> 2 blocks each, only 3 exist
    assert scheduler.requests["young"].status == RequestStatus.PREEMPTED
    assert scheduler.requests["young"].num_computed_tokens == 0
    assert list(scheduler.waiting) == [scheduler.requests["young"]]
    while "old" in scheduler.requests:
        out = step(scheduler)
        assert [s.request_id for s in out.scheduled] == ["old"]
    # The survivor's blocks are back; the preempted request recomputes prompt + its output.
    out = step(scheduler)
    young = scheduler.requests["young"]
    assert out.scheduled[0].token_ids == [4, 5, 6, 7, 7]
    assert young.output_token_ids == [7, 7, 7]
    while scheduler.requests:
        step(scheduler)


def test_stops_on_eos_after_min_tokens_and_on_stop_ids(track_kv) -> None:
    scheduler = make_scheduler(track_kv)
    add(scheduler, "eos", [1], min_tokens=2)
    add(scheduler, "stop_id", [1], stop_token_ids=[EOS + 1], ignore_eos=True)
    add(scheduler, "ignore", [1], ignore_eos=True, max_tokens=3)
    step(scheduler, token=EOS)
    assert set(scheduler.requests) == {"eos", "stop_id", "ignore"}
    step(scheduler, token=EOS)
    assert set(scheduler.requests) == {"stop_id", "ignore"}
    out = scheduler.schedule()
    finished = scheduler.update_from_output(out, ModelRunnerOutput({"stop_id": EOS + 1, "ignore": EOS}, {}))
    by_id = {r.request_id: r for r in finished}
    assert by_id["stop_id"].status == RequestStatus.FINISHED_STOPPED and by_id["stop_id"].stop_reason == EOS + 1
    assert by_id["ignore"].status == RequestStatus.FINISHED_LENGTH
    assert not scheduler.requests


def test_rejects_requests_that_never_fit(track_kv) -> None:
    scheduler = make_scheduler(track_kv, num_blocks=4, max_model_len=32)
    with pytest.raises(RequestRejected, match="max_model_len"):
        add(scheduler, "long", list(range(30)), max_tokens=8)
    with pytest.raises(RequestRejected, match="at most 32"):
        add(scheduler, "longer", list(range(40)))
    with pytest.raises(RequestRejected, match="KV cache capacity"):
        add(scheduler, "kv", list(range(10)), max_tokens=10)
    add(scheduler, "default", list(range(10)), max_tokens=None)
    assert scheduler.requests["default"].max_tokens == 6
    scheduler.finish_requests(["default"], RequestStatus.FINISHED_ABORTED)


def test_prefix_hit_recorded_as_cached_tokens(track_kv) -> None:
    scheduler = make_scheduler(track_kv)
    add(scheduler, "a", list(range(9)), max_tokens=1)
    step(scheduler)
    add(scheduler, "b", list(range(9)), max_tokens=1)
    out = scheduler.schedule()
    assert out.scheduled[0].num_computed_tokens == 8 and out.scheduled[0].token_ids == [8]
    assert scheduler.requests["b"].num_cached_tokens == 8
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)


def test_abort_waiting_and_running_frees_blocks(track_kv) -> None:
    scheduler = make_scheduler(track_kv, max_num_seqs=1)
    add(scheduler, "run", [1, 2, 3])
    add(scheduler, "wait", [1, 2, 3])
    step(scheduler)
    finished = scheduler.finish_requests(["run", "wait", "missing"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in finished] == ["run", "wait"]
    assert scheduler.kv_cache_manager.num_free_blocks == 16


def test_remote_decode_request_parks_after_its_first_token_until_released(track_kv) -> None:
    scheduler = make_scheduler(track_kv)
    request = scheduler.make_request("p", list(range(10)), SamplingParams(max_tokens=8), frozenset({EOS}),
                                     remote_decode=True)
    scheduler.add_request(request)
    out = step(scheduler)
    assert out.scheduled[0].sample and request.output_token_ids == [7]
    assert request.status == RequestStatus.FINISHED_PREFILLED and scheduler.num_unfinished_requests == 0
    assert scheduler.kv_cache_manager.get_block_ids("p") == [0, 1, 2]
    assert scheduler.schedule().finished_request_ids == {"p"}  # the runner drops its state
    with pytest.raises(ValueError, match="already in use"):
        add(scheduler, "p", [1])
    assert scheduler.release_prefilled("p")
    assert not scheduler.release_prefilled("p")


def test_committed_remote_kv_decodes_from_its_prompt_and_waits_for_a_seat(track_kv) -> None:
    scheduler = make_scheduler(track_kv, max_num_seqs=1)
    add(scheduler, "busy", [50, 51])
    step(scheduler)
    request = scheduler.make_request("d", list(range(9)), SamplingParams(max_tokens=4), frozenset({EOS}))
    reservation = scheduler.reserve_remote_kv(request)
    assert reservation.block_ids == (1, 2, 3) and reservation.num_computed_blocks == 0
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert scheduler.commit_remote_kv("d", first_token_id=42) is request
    assert request.num_computed_tokens == 9 and request.output_token_ids == [42]
    assert [s.request_id for s in step(scheduler).scheduled] == ["busy"]  # max_num_seqs=1
    scheduler.finish_requests(["busy"], RequestStatus.FINISHED_ABORTED)
    out = step(scheduler)
    (seq,) = out.scheduled
    assert (seq.request_id, seq.num_computed_tokens, seq.token_ids, seq.sample) == ("d", 9, [42], True)
    assert out.new_requests[0].output_token_ids == [42]
    assert scheduler.kv_cache_manager.prefix_cache_hits == 0
    scheduler.finish_requests(["d"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.commit_remote_kv("d", first_token_id=42) is None


# ---- long prompts: chunks beside decodes, the decodes' reserve, preemption and prefix hits ----

LONG_PROMPT = list(range(100, 141))  # 41 tokens: 10 full blocks and one token
TURBO = -1


def chunks_of(scheduler: Scheduler, request_id: str, max_steps: int = 64) -> list[tuple[int, int, bool]]:
    """Step until `request_id` finishes: its (num_computed_tokens, num_new, sample) per step it was scheduled."""
    chunks = []
    for _ in range(max_steps):
        if request_id not in scheduler.requests:
            return chunks
        chunks += [(s.num_computed_tokens, len(s.token_ids), s.sample)
                   for s in step(scheduler).scheduled if s.request_id == request_id]
    raise AssertionError(f"{request_id} did not finish in {max_steps} steps")


def _decodes_beside_a_turbo_long_prompt(track_kv, decode_share: float) -> tuple[Scheduler, list[list[str]]]:
    """Two standard requests decoding, then a higher-priority long prompt ahead of them: who each step schedules
    while it prefills."""
    scheduler = make_scheduler(track_kv, num_blocks=32, budget=8, decode_share=decode_share)
    add(scheduler, "d1", [1, 2], ignore_eos=True, max_tokens=20)
    add(scheduler, "d2", [3, 4], ignore_eos=True, max_tokens=20)
    step(scheduler)
    add(scheduler, "long", LONG_PROMPT, priority=TURBO, max_tokens=1)
    steps = []
    while "long" in scheduler.requests:
        steps.append([s.request_id for s in step(scheduler).scheduled])
    return scheduler, steps


def test_decodes_keep_their_reserve_beside_a_long_prompt_ahead_of_them(track_kv) -> None:
    scheduler, steps = _decodes_beside_a_turbo_long_prompt(track_kv, decode_share=0.25)
    assert all({"d1", "d2"} <= set(ids) for ids in steps), steps
    assert scheduler.requests["d1"].num_output_tokens == len(steps) + 1
    # The prefill still moves at budget - 2 = 6 tokens a step (the reserve: one token per decode, under 2).
    assert len(steps) == -(-len(LONG_PROMPT) // 6)
    scheduler.finish_requests(["d1", "d2"], RequestStatus.FINISHED_ABORTED)


def test_without_the_reserve_a_long_prompt_ahead_starves_the_decodes(track_kv) -> None:
    scheduler, steps = _decodes_beside_a_turbo_long_prompt(track_kv, decode_share=0.0)
    # Admitted behind the decodes (they take 2 of its first step's 8), it then runs ahead of them: every step
    # up to its last chunk is the prompt's alone, the decodes wait it out.
    assert steps[0] == ["d1", "d2", "long"] and len(steps) == 1 + -(-(len(LONG_PROMPT) - 6) // 8)
    assert steps[1:-1] == [["long"]] * (len(steps) - 2)
    scheduler.finish_requests(["d1", "d2"], RequestStatus.FINISHED_ABORTED)


def test_the_reserve_is_capped_by_the_share_and_unused_reserve_goes_to_prefills(track_kv) -> None:
    scheduler = make_scheduler(track_kv, num_blocks=32, budget=8, decode_share=0.25)  # at most 2 of 8 tokens
    for i in range(4):
        add(scheduler, f"d{i}", [i + 1], ignore_eos=True, max_tokens=20)
    step(scheduler)
    add(scheduler, "long", LONG_PROMPT, priority=TURBO, max_tokens=1)
    out = step(scheduler)  # admitted behind the four decodes, with what they leave
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled][-1] == ("long", 4)
    # Ahead of four decodes with a reserve of 2: the prompt takes 6, the two oldest decodes the rest.
    out = step(scheduler)
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [("long", 6), ("d0", 1), ("d1", 1)]
    scheduler.finish_requests(["d1", "d2", "d3"], RequestStatus.FINISHED_ABORTED)
    # One decode left, a reserve of 1: the prompt gets 7, not 6.
    out = step(scheduler)
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [("long", 7), ("d0", 1)]
    scheduler.finish_requests(["d0", "long"], RequestStatus.FINISHED_ABORTED)


def test_a_long_prompt_prefills_in_chunks_beside_decodes_behind_them(track_kv) -> None:
    scheduler = make_scheduler(track_kv, budget=8)
    add(scheduler, "d", [1, 2], ignore_eos=True, max_tokens=30)
    step(scheduler)
    add(scheduler, "long", LONG_PROMPT, max_tokens=1)
    chunks = chunks_of(scheduler, "long")
    # Each step: the decode's token, then 7 of the prompt's; the last chunk samples.
    assert chunks == [(7 * i, min(7, len(LONG_PROMPT) - 7 * i), i == 5) for i in range(6)]
    assert scheduler.requests["d"].num_output_tokens == 1 + len(chunks)
    scheduler.finish_requests(["d"], RequestStatus.FINISHED_ABORTED)


def test_prefix_hits_on_a_long_prompt_skip_its_chunks(track_kv) -> None:
    scheduler = make_scheduler(track_kv, budget=8)
    add(scheduler, "first", LONG_PROMPT, max_tokens=1)
    assert len(chunks_of(scheduler, "first")) == 6
    # Same 40-token prefix, another tail: the 10 cached blocks are skipped, the rest is one chunk.
    add(scheduler, "shared", [*LONG_PROMPT[:40], 7, 8, 9], max_tokens=1)
    assert chunks_of(scheduler, "shared") == [(40, 3, True)]
    assert scheduler.requests == {} and scheduler.kv_cache_manager.prefix_cache_hits == 40
    # A hit that stops mid-prompt (the first 5 blocks) leaves the rest to chunks after it.
    add(scheduler, "diverges", [*LONG_PROMPT[:22], *range(200, 219)], max_tokens=1)
    assert chunks_of(scheduler, "diverges") == [(20, 8, False), (28, 8, False), (36, 5, True)]


def test_a_preempted_long_prompt_resumes_and_skips_the_chunks_it_had_cached(track_kv) -> None:
    # 12 blocks: the prompt needs 11; an older decode growing into a new block preempts it mid-prefill.
    scheduler = make_scheduler(track_kv, num_blocks=12, budget=8)
    add(scheduler, "old", [1, 2, 3], ignore_eos=True, max_tokens=8)
    step(scheduler)
    add(scheduler, "long", LONG_PROMPT, max_tokens=2, ignore_eos=True)
    long = scheduler.requests["long"]
    preempted_at = None
    for _ in range(16):
        out = step(scheduler)
        if "long" in out.preempted_request_ids:
            preempted_at = out
            break
    assert preempted_at is not None and long.status == RequestStatus.PREEMPTED and long.num_computed_tokens == 0
    while "old" in scheduler.requests:
        step(scheduler)
    chunks = chunks_of(scheduler, "long")
    # Resumed from its cached full blocks (not from 0), and on to its two output tokens.
    assert chunks[0][0] > 0 and chunks[0][0] % BLOCK_SIZE == 0
    assert sum(n for _, n, _ in chunks) == len(LONG_PROMPT) + 1 - chunks[0][0]
    assert long.num_output_tokens == 2 and scheduler.num_preemptions == 1


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_the_reserved_share_is_a_share(share: float) -> None:
    with pytest.raises(ValueError, match="decode_reserved_share"):
        EngineConfig(model="unused", decode_reserved_share=share)
