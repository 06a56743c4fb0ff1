from __future__ import annotations

import pytest

from k2ray.engine.kv.kv_cache_manager import KVCacheManager
from k2ray.engine.outputs import ModelRunnerOutput, SchedulerOutput
from k2ray.engine.request import RequestStatus
from k2ray.engine.scheduler import RequestRejected, Scheduler
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4
EOS = 99


def make_scheduler(track_kv, num_blocks: int = 16, budget: int = 32, max_num_seqs: int = 8,
                   max_model_len: int = 64, caching: bool = True) -> Scheduler:
    manager = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=caching)
    track_kv(manager)
    return Scheduler(manager, max_num_seqs, budget, max_model_len)


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
