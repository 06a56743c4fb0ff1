"""PrefillAgent on a real prefill-role engine (no Ray, no transfer): prefills answered with their
first token and held, queue time measured from the scheduler, holds dropped on abort, and the cached
block hashes it advertises are the ones request routers compute for the same prompt."""

from __future__ import annotations

import time

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.engine.config import EngineConfig
from k2ray.engine.llm_engine import LLMEngine
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams
from k2ray.serve.pd.pd_protocol import CoreCachedHashes, CorePrefill, CoreSendKV, Prefilled, Sent
from k2ray.serve.pd.prefill_agent import PrefillAgent
from k2ray.serve.pd.prefix_hashes import prompt_block_hashes

BLOCK_SIZE = 4
PROMPT_A = list(range(1, 14))  # 3 full blocks
PROMPT_B = list(range(20, 31))


def make_agent() -> tuple[PrefillAgent, dict[int, object]]:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint_dir()), role="prefill", block_size=BLOCK_SIZE,
                                    num_kv_blocks=64, max_num_seqs=1, max_num_batched_tokens=64,
                                    max_model_len=128))
    replies: dict[int, object] = {}
    agent = PrefillAgent(engine, KVTransferConfig(), lambda ack_id, payload: replies.__setitem__(ack_id, payload),
                         lambda message: None)
    return agent, replies


def run(agent: PrefillAgent) -> None:
    while agent.engine.has_unfinished_requests():
        start = time.monotonic()
        outputs = agent.engine.step()
        agent.after_step(start)
        for output in outputs:
            assert agent.on_output(output)


def test_prefills_are_held_with_their_queue_time_and_freed_on_abort():
    agent, replies = make_agent()
    params = SamplingParams(temperature=0, max_tokens=1)
    agent.handle(CorePrefill("a", PROMPT_A, params, 0))
    agent.handle(CorePrefill("b", PROMPT_B, params, 1))  # max_num_seqs 1: waits for a's step
    run(agent)
    a, b = replies[0], replies[1]
    assert isinstance(a, Prefilled) and isinstance(b, Prefilled)
    assert a.result.num_tokens == len(PROMPT_A) and b.result.num_tokens == len(PROMPT_B)
    assert b.queue_s > a.queue_s  # b sat in the queue through a's whole step
    assert agent.stats()["num_held_prefills"] == 2
    manager = agent.engine.kv_cache_manager
    assert manager.num_free_blocks < manager.num_total_blocks
    assert agent.abort("a") and agent.abort("b") and not agent.abort("c")
    assert agent.stats()["num_held_prefills"] == 0
    assert manager.num_free_blocks == manager.num_total_blocks


def test_cached_hashes_match_what_routers_compute():
    agent, replies = make_agent()
    agent.handle(CorePrefill("a", PROMPT_A, SamplingParams(temperature=0, max_tokens=1), 0))
    run(agent)
    agent.handle(CoreCachedHashes(16, 1))
    assert set(prompt_block_hashes(PROMPT_A, BLOCK_SIZE)) <= set(replies[1])
    agent.handle(CoreCachedHashes(0, 2))
    assert replies[2] == ()


def test_send_of_nothing_held_is_answered_not_raised():
    agent, replies = make_agent()
    agent.handle(CoreSendKV("missing", None, None, 5))  # type: ignore[arg-type]
    assert isinstance(replies[5], Sent) and "no prefilled KV" in replies[5].error
