"""The colocated app with `engine: {ep_size: 2}`: one replica of two rank cores, routed experts sharded over
them. Greedy outputs over HTTP equal the in-process single engine's, for concurrent requests of very
different lengths that land on both ranks; every rank's blocks are free afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.serve.ep.conftest import EP_SIZE
from tests.serve.pd.pd_requests import complete, llm_texts, prompt, text

# Very different prompt lengths, sent together: the replica spreads them over its ranks.
PROMPT_LENGTHS = [3, 310, 17, 160, 1, 64]
BLOCKS_FREE_TIMEOUT_S = 10.0


async def all_blocks_free(stats_of: Callable[[], Awaitable[dict]]) -> dict:
    """A pool's stats once its blocks are all free (or after BLOCKS_FREE_TIMEOUT_S)."""
    deadline = asyncio.get_running_loop().time() + BLOCKS_FREE_TIMEOUT_S
    while True:
        stats = await stats_of()
        if stats["num_free_blocks"] == stats["num_total_blocks"] or asyncio.get_running_loop().time() > deadline:
            return stats
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_greedy_identical_to_one_engine(ep_app, reference_llm):
    prompts = [prompt(200 + seed, length) for seed, length in enumerate(PROMPT_LENGTHS)]
    expected = llm_texts(reference_llm, prompts)
    bodies = await asyncio.gather(*(complete(ep_app.base_url, ep_app.model, p) for p in prompts))
    assert [text(b) for b in bodies] == expected
    lone = await complete(ep_app.base_url, ep_app.model, prompts[1])  # one rank busy, the other stepping empty
    assert text(lone) == expected[1]
    stats = await all_blocks_free(ep_app.stats)
    assert stats["ep_size"] == EP_SIZE and len(stats["ranks"]) == EP_SIZE
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    # Both ranks served requests.
    assert all(rank["num_generation_tokens"] > 0 for rank in stats["ranks"])


@pytest.mark.slow
async def test_pd_ep_greedy_identical_to_one_engine(pd_ep_app, reference_llm):
    """Both pools of 2 ranks, every prompt prefilled remotely: each KV goes from the prefill rank that computed
    it to the decode rank that holds the request."""
    prompts = [prompt(300 + seed, length) for seed, length in enumerate(PROMPT_LENGTHS)]
    expected = llm_texts(reference_llm, prompts)
    bodies = await asyncio.gather(*(complete(pd_ep_app.base_url, pd_ep_app.model, p) for p in prompts))
    assert [text(b) for b in bodies] == expected
    stats = await all_blocks_free(pd_ep_app.stats)
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert all(rank["num_generation_tokens"] > 0 for rank in stats["ranks"])


@pytest.mark.slow
async def test_each_rank_holds_its_own_bundle(ep_app):
    """One placement-group bundle per rank: the replica actor takes bundle 0, a RankBundle actor each other
    one, and Ray's own accounting shows every rank's bundle taken (CPU_group_R_PG: that bundle's CPUs)."""
    import ray

    stats = await ep_app.stats()
    bundles = stats["rank_bundles"]
    assert [b["rank"] for b in bundles] == [b["bundle_index"] for b in bundles] == list(range(EP_SIZE))
    assert len({b["placement_group_id"] for b in bundles}) == 1 and len({b["node_id"] for b in bundles}) == 1
    assert all(tuple(b["gpu_ids"]) == () for b in bundles)  # CPUs only here
    placement_group_id = bundles[0]["placement_group_id"]
    available = ray.available_resources()
    assert all(available.get(f"CPU_group_{rank}_{placement_group_id}", 0.0) == 0.0 for rank in range(EP_SIZE))
