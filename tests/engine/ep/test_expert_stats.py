"""The engine's expert load statistics (get_stats().expert_load): every token the model ran counted top_k times
per MoE layer, cumulative across stats calls; an EPLB placement (redundant experts) through LLM keeps the greedy
tokens."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from conftest import track_engine

from k2ray import LLM, SamplingParams
from k2ray.dist.eplb import rebalance
from k2ray.engine.ep.expert_stats import ExpertLoadStats
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.expert_map import moe_layer_ids

NUM_NEW_TOKENS = 5
PROMPTS = [{"prompt_token_ids": list(range(100, 117))}, {"prompt_token_ids": [7, 8, 9]}]
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
ENGINE = dict(model=tiny_checkpoint_dir(), block_size=4, num_kv_blocks=64, max_model_len=128,
              enable_prefix_caching=False, enable_structured_output=False)


@pytest.fixture(scope="module")
def module_llm() -> LLM:
    return LLM(**ENGINE)


def num_forward_tokens(prompts) -> int:
    """Prompt tokens, then one decode per new token after the first."""
    return sum(len(p["prompt_token_ids"]) + NUM_NEW_TOKENS - 1 for p in prompts)


def test_stats_count_every_routed_token(module_llm):
    track_engine(module_llm)
    engine = module_llm.llm_engine
    top_k = engine.model_args.num_experts_per_tok
    before = engine.get_stats().expert_load
    module_llm.generate(PROMPTS, GREEDY)
    after = engine.get_stats().expert_load
    grown = [sum(a) - sum(b) for a, b in zip(after.tokens_per_expert, before.tokens_per_expert, strict=True)]
    assert len(grown) == len(moe_layer_ids(engine.model_args))
    assert grown == [num_forward_tokens(PROMPTS) * top_k] * len(grown)
    assert [sum(row) for row in after.tokens_per_rank] == [sum(row) for row in after.tokens_per_expert]
    assert after.rank_imbalance == 1.0  # one rank holds every expert
    assert engine.get_stats().expert_load == after  # reading does not restart the count
    # The stats call's dict form (what the serve replica relays) carries it as plain lists and numbers.
    relayed = asdict(engine.get_stats())["expert_load"]
    assert relayed["tokens_per_expert"] == after.tokens_per_expert


def test_merge_sums_the_ranks_reports():
    ranks = [ExpertLoadStats(((4, 0, 2, 2),), ((4, 4),), 1.0), ExpertLoadStats(((4, 0, 0, 0),), ((4, 0),), 2.0)]
    merged = ExpertLoadStats.merge(ranks)
    assert merged.tokens_per_expert == ((8, 0, 2, 2),) and merged.tokens_per_rank == ((8, 4),)
    assert merged.rank_imbalance == 8 / 6
    assert merged.num_tokens_per_expert == [8, 0, 2, 2]


def test_a_placement_with_replicas_keeps_the_greedy_tokens(module_llm, tmp_path):
    track_engine(module_llm)
    engine = module_llm.llm_engine
    expected = [o.outputs[0].token_ids for o in module_llm.generate(PROMPTS, GREEDY)]
    load = engine.get_stats().expert_load.tokens_per_expert
    path = tmp_path / "placement.json"
    rebalance(load, moe_layer_ids(engine.model_args), 1, num_redundant_experts=4).save(path)
    replicated = LLM(**ENGINE, ep_placement=str(path))
    track_engine(replicated)
    assert [o.outputs[0].token_ids for o in replicated.generate(PROMPTS, GREEDY)] == expected
    assert replicated.llm_engine.model_runner.model.num_physical_experts == engine.model_args.n_routed_experts + 4


@pytest.mark.slow
def test_an_ep_group_with_a_placement_keeps_the_greedy_tokens(module_llm, tmp_path):
    """LLM(ep_size=2, ep_placement=...): two rank processes, one redundant expert per rank."""
    track_engine(module_llm)
    engine = module_llm.llm_engine
    expected = [o.outputs[0].token_ids for o in module_llm.generate(PROMPTS, GREEDY)]
    path = tmp_path / "placement.json"
    load = engine.get_stats().expert_load.tokens_per_expert
    rebalance(load, moe_layer_ids(engine.model_args), 2, num_redundant_experts=2).save(path)
    group = LLM(**ENGINE, ep_size=2, ep_placement=str(path), skip_tokenizer_init=True)
    try:
        assert [o.outputs[0].token_ids for o in group.generate(PROMPTS, GREEDY)] == expected
    finally:
        group.llm_engine.shutdown()
