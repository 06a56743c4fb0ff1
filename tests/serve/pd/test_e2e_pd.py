"""The disaggregated app end to end (router -> decode pool -> prefill pool, KV over gloo pairs):
greedy outputs identical to the colocated app and to LLM.generate, with and without prefix hits on
either side and with local prefill on and off; `cached_tokens` is the prefill engine's real hits."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.serve.pd.pd_requests import complete, llm_texts, prompt, text

PROMPT_LENGTHS = (5, 17, 48, 130, 300)
NUM_CONCURRENT = 32

async def all_blocks_free(app) -> None:
    for pool in ("decode", "prefill"):
        for stats in await app.replica_stats(pool):  # every replica, each asked by a pinned call
            assert stats["num_free_blocks"] == stats["num_total_blocks"], (pool, stats)
            assert stats["num_kv_transfers_in_flight"] == 0, (pool, stats)
            assert stats.get("num_held_prefills", 0) == 0, (pool, stats)


@pytest.mark.parametrize("app_fixture", ["pd_app", "pd_2x2_app", "pd_local_app"])
async def test_greedy_identical_to_colocated_and_llm(request, app_fixture, live_app, reference_llm):
    app = request.getfixturevalue(app_fixture)
    prompts = [prompt(seed, length) for seed, length in enumerate(PROMPT_LENGTHS)]
    prompts += [prompts[-1], prompts[-1][:200] + prompt(99, 40)]  # a repeat, and a shared prefix: hits
    expected = llm_texts(reference_llm, prompts)
    for token_ids, want in zip(prompts, expected, strict=True):
        colocated = await complete(live_app.base_url, live_app.model, token_ids)
        disaggregated = await complete(app.base_url, app.model, token_ids)
        assert text(colocated) == want
        assert text(disaggregated) == want
    await all_blocks_free(app)


async def test_concurrent_requests_identical(pd_2x2_app, live_app, reference_llm):
    prompts = [prompt(100 + i % 8, 20 + 37 * (i % 8)) for i in range(NUM_CONCURRENT)]  # repeats: hits mid-run
    expected = llm_texts(reference_llm, prompts)
    bodies = await asyncio.gather(*(complete(pd_2x2_app.base_url, pd_2x2_app.model, p) for p in prompts))
    assert [text(b) for b in bodies] == expected
    await all_blocks_free(pd_2x2_app)


async def test_a_decode_failure_after_a_remote_prefill_is_a_500(pd_app):
    async with httpx.AsyncClient(timeout=60.0) as client:
        response = await client.post(f"{pd_app.base_url}/v1/completions", json={
            "model": pd_app.model, "prompt": prompt(9, 64), "max_tokens": 16, "ignore_eos": True,
            "k2ray_test": {"fail_after_tokens": 3}})
    assert response.status_code == 500, response.text
    assert "Traceback" not in response.text
    await all_blocks_free(pd_app)


async def test_local_prefill_below_threshold(pd_local_app):
    before = await pd_local_app.stats("decode")
    await complete(pd_local_app.base_url, pd_local_app.model, prompt(7, 20))  # 20 missing < 48: local
    await complete(pd_local_app.base_url, pd_local_app.model, prompt(8, 120))  # remote
    after = await pd_local_app.stats("decode")
    assert after["num_local_prefills"] - before["num_local_prefills"] == 1
    assert after["num_remote_prefills"] - before["num_remote_prefills"] == 1


async def test_cached_tokens_are_the_prefill_engines_hits(pd_app):
    shared = prompt(42, 160)
    await complete(pd_app.base_url, pd_app.model, shared + prompt(43, 9))
    before = await pd_app.stats("prefill")
    body = await complete(pd_app.base_url, pd_app.model, shared + prompt(44, 11))
    after = await pd_app.stats("prefill")
    num_hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    assert num_hits == 160  # ten full blocks of 16
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == num_hits
