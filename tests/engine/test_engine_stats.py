"""The engine's stats totals that its serve replica relays as Prometheus counters: tokens computed and
generated, prefix-cache blocks, preemptions."""

from __future__ import annotations

import pytest
from conftest import track_engine

from k2ray.engine.llm import LLM
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4
PROMPT = list(range(300, 340))  # 10 full blocks
NUM_NEW_TOKENS = 6


NUM_KV_BLOCKS = 24  # room for two prompts, too few for three growing requests at once


@pytest.fixture(scope="module")
def module_llm() -> LLM:
    return LLM(tiny_checkpoint_dir(), block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS, max_model_len=256,
               enable_prefix_caching=True)


@pytest.fixture
def llm(module_llm: LLM) -> LLM:
    track_engine(module_llm)
    return module_llm


def test_tokens_and_cached_blocks_count_what_the_engine_computed(llm):
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": PROMPT}, params)[0]
    stats = llm.llm_engine.get_stats()
    assert stats.num_prompt_tokens == len(PROMPT)
    assert stats.num_generation_tokens == len(first.outputs[0].token_ids) == NUM_NEW_TOKENS
    # Every full block the request filled (prompt and output) stays in the prefix cache once it is freed.
    assert stats.num_cached_blocks == (len(PROMPT) + NUM_NEW_TOKENS - 1) // BLOCK_SIZE
    again = llm.generate({"prompt_token_ids": PROMPT}, params)[0]
    stats = llm.llm_engine.get_stats()
    # The hit's tokens are not computed again: only what the cache missed counts.
    assert again.num_cached_tokens > 0
    assert stats.num_prompt_tokens == 2 * len(PROMPT) - again.num_cached_tokens
    assert stats.num_generation_tokens == 2 * NUM_NEW_TOKENS
    assert stats.num_preemptions == 0


def test_preemptions_are_counted(llm):
    before = llm.llm_engine.get_stats()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": [p + i for p in PROMPT]} for i in range(3)]
    outputs = llm.generate(prompts, params)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions == llm.llm_engine.scheduler.num_preemptions > before.num_preemptions
    # A recomputed request samples each of its tokens once: none is counted twice.
    assert stats.num_generation_tokens - before.num_generation_tokens == \
        sum(len(o.outputs[0].token_ids) for o in outputs)
