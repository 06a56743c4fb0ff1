"""vLLM's priority policy: admission, budget, running order and preemption by (priority, arrival)."""

from __future__ import annotations

import pytest
from test_scheduler import BLOCK_SIZE, EOS, make_scheduler, step

from k2ray.engine.config import EngineConfig
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.request import RequestStatus
from k2ray.engine.scheduler import Scheduler
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams

# Lower is served first, as in vLLM.
TURBO = -1
STANDARD = 0


def add(scheduler: Scheduler, request_id: str, prompt: list[int], priority: int, **params) -> None:
    params = SamplingParams(priority=priority, ignore_eos=True, **params)
    scheduler.add_request(scheduler.make_request(request_id, prompt, params, frozenset({EOS})))


def scheduled(out) -> list[tuple[str, int, int]]:
    return [(s.request_id, s.num_computed_tokens, len(s.token_ids)) for s in out.scheduled]


def drain(scheduler: Scheduler) -> list[set[str]]:
    """Step until every request is done; the ids that finished, step by step (steps finishing none left out)."""
    finished: list[set[str]] = []
    while scheduler.requests:
        live = set(scheduler.requests)
        step(scheduler)
        if done := live - set(scheduler.requests):
            finished.append(done)
    return finished


def test_waiting_requests_are_admitted_by_priority_then_arrival(track_kv) -> None:
    scheduler = make_scheduler(track_kv, max_num_seqs=2)
    add(scheduler, "s0", [1, 2], STANDARD, max_tokens=2)
    add(scheduler, "s1", [3, 4], STANDARD, max_tokens=2)
    add(scheduler, "t0", [5, 6], TURBO, max_tokens=2)
    add(scheduler, "t1", [7, 8], TURBO, max_tokens=2)
    assert [r.request_id for r in scheduler.waiting] == ["t0", "t1", "s0", "s1"]
    assert [s.request_id for s in step(scheduler).scheduled] == ["t0", "t1"]
    step(scheduler)  # the turbo pair finishes
    add(scheduler, "t2", [9, 10], TURBO, max_tokens=2)  # arrives last, still goes first
    assert [s.request_id for s in step(scheduler).scheduled] == ["t2", "s0"]
    assert drain(scheduler) == [{"s0", "t2"}, {"s1"}]


def test_the_prefill_budget_goes_to_the_higher_priority_first(track_kv) -> None:
    scheduler = make_scheduler(track_kv, budget=4)
    add(scheduler, "s", list(range(10, 18)), STANDARD, max_tokens=1)  # 8-token prompt, arrived first
    add(scheduler, "t", [1, 2], TURBO, max_tokens=3)
    assert scheduled(step(scheduler)) == [("t", 0, 2), ("s", 0, 2)]
    # Running requests in priority order too: the older standard request gets what the turbo decode leaves.
    assert scheduled(step(scheduler)) == [("t", 2, 1), ("s", 2, 3)]
    assert scheduled(step(scheduler)) == [("t", 3, 1), ("s", 5, 3)]
    assert not scheduler.requests


def test_equal_priorities_keep_first_come_first_served(track_kv) -> None:
    scheduler = make_scheduler(track_kv, budget=4)
    add(scheduler, "old", list(range(10, 18)), TURBO, max_tokens=1)
    add(scheduler, "young", [1, 2], TURBO, max_tokens=3)
    assert scheduled(step(scheduler)) == [("old", 0, 4)]
    assert scheduled(step(scheduler)) == [("old", 4, 4)]
    assert scheduled(step(scheduler)) == [("young", 0, 2)]
    drain(scheduler)


def test_preemption_takes_the_lowest_priority_then_the_youngest(track_kv) -> None:
    # 4 blocks of 4 tokens; each request needs a second block once it holds 4 tokens.
    scheduler = make_scheduler(track_kv, num_blocks=4, caching=False)
    add(scheduler, "s_old", [1, 2, 3], STANDARD, max_tokens=4)
    add(scheduler, "s_young", [4, 5, 6], STANDARD, max_tokens=4)
    add(scheduler, "t", [7, 8, 9], TURBO, max_tokens=4)
    assert [s.request_id for s in step(scheduler).scheduled] == ["t", "s_old", "s_young"]
    step(scheduler)  # 4 tokens each, 3 blocks used
    out = step(scheduler)  # the turbo request takes the last free block; s_old needs one more
    assert out.preempted_request_ids == {"s_young"}
    assert [s.request_id for s in out.scheduled] == ["t", "s_old"]
    s_young = scheduler.requests["s_young"]
    assert (s_young.status, s_young.num_computed_tokens) == (RequestStatus.PREEMPTED, 0)
    # Back in the queue in its own place: behind later turbo arrivals, ahead of later standard ones.
    add(scheduler, "s_new", [10], STANDARD, max_tokens=1)
    add(scheduler, "t_new", [11], TURBO, max_tokens=1)
    assert [r.request_id for r in scheduler.waiting] == ["t_new", "s_young", "s_new"]
    assert drain(scheduler) == [{"s_old", "t"}, {"t_new", "s_new"}, {"s_young"}]
    assert scheduler.num_preemptions == 1


def test_a_turbo_request_preempts_an_older_standard_one_not_itself(track_kv) -> None:
    scheduler = make_scheduler(track_kv, num_blocks=3, caching=False)
    add(scheduler, "s", [1, 2, 3], STANDARD, max_tokens=6)
    add(scheduler, "t", [4, 5, 6], TURBO, max_tokens=6)
    step(scheduler)
    step(scheduler)
    out = step(scheduler)  # both at 4 tokens + 1 -> 2 blocks each, only 3 exist
    assert out.preempted_request_ids == {"s"} and [s.request_id for s in out.scheduled] == ["t"]
    assert drain(scheduler) == [{"t"}, {"s"}]
    assert scheduler.num_preemptions == 1


@pytest.fixture(scope="module")
def shared_engine() -> LLMEngine:
    config = EngineConfig(model=str(tiny_checkpoint_dir()), block_size=BLOCK_SIZE, num_kv_blocks=64,
                          max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                          skip_tokenizer_init=True, enable_structured_output=False)
    return LLMEngine(config)


def run_to_completion(engine: LLMEngine) -> list[str]:
    finished: list[str] = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    return finished


def test_under_saturation_turbo_requests_finish_first(shared_engine: LLMEngine, track_kv) -> None:
    engine = shared_engine
    track_kv(engine.kv_cache_manager)

    def submit(request_id: str, priority: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, priority=priority)
        engine.add_request(request_id, [11, 12, 13, 14, 15], params)

    for i in range(4):
        submit(f"std-{i}", STANDARD)
    engine.step()  # two standard requests hold both seats (max_num_seqs=2)
    for i in range(4):
        submit(f"turbo-{i}", TURBO)
    finished = run_to_completion(engine)
    # The two already running finish, then every turbo request before the waiting standard ones.
    assert finished == ["std-0", "std-1", "turbo-0", "turbo-1", "turbo-2", "turbo-3", "std-2", "std-3"]


def test_without_priorities_the_same_load_is_first_come_first_served(shared_engine: LLMEngine, track_kv) -> None:
    engine = shared_engine
    track_kv(engine.kv_cache_manager)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"a-{i}", [11, 12, 13, 14, 15], params)
    engine.step()
    for i in range(4):
        engine.add_request(f"b-{i}", [11, 12, 13, 14, 15], params)
    assert run_to_completion(engine) == ["a-0", "a-1", "a-2", "a-3", "b-0", "b-1", "b-2", "b-3"]
