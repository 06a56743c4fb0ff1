"""Disaggregated apps whose pools differ in EP: decode of 2 ranks with a prefill replica of one core, and
prefill of 2 ranks with a decode replica of one core. Every prompt is prefilled remotely; the prefill
replica names the core (rank) that holds the KV and the decode core (rank) pairs with it, so greedy outputs
equal the in-process single engine's and every block is free afterwards on both sides."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.serve.ep.conftest import EP_SIZE, LOOPBACK, deploy
from tests.serve.ep.test_e2e_ep import PROMPT_LENGTHS, all_blocks_free
from tests.serve.pd.pd_requests import complete, llm_texts, prompt, text

# Opt-in (`pytest -m ep_wide tests/serve/ep`): two more P/D apps, about 50 s on 2 cores; the default run keeps
# pd-ep.yaml's layout (both pools EP) in test_e2e_ep.py.
pytestmark = pytest.mark.ep_wide

PD = {"kv_host": LOOPBACK, "local_prefill_threshold": 0, "routing_stats_period_s": 0.2}
# A held prefill stays on its rank until its KV is sent: slow sends (one block per chunk) keep the
# concurrent requests' prefills overlapping, so the least loaded rank is not always the first.
SLOW_SENDS = {"pd": {**PD, "kv_max_chunk_bytes": 8 * 1024},
              "testing": {"allow_injection": True, "kv_send_chunk_delay_s": 0.05}}


def prefill_stats(name: str) -> Callable[[], Awaitable[dict]]:
    """The stats call of an app's prefill pool (EPApp's handle is on the decode pool)."""
    from ray import serve

    from k2ray.serve.app import PREFILL_DEPLOYMENT

    return serve.get_deployment_handle(PREFILL_DEPLOYMENT, app_name=name).stats.remote


@pytest.fixture(scope="module")
def decode_ep_app(live_app):
    from ray import serve

    yield deploy(live_app, "pdmix-dep", {"disaggregated": True, "prefill": {"ep_size": 1}, "pd": PD})
    serve.delete("pdmix-dep")


@pytest.fixture(scope="module")
def prefill_ep_app(live_app):
    from ray import serve

    yield deploy(live_app, "pdmix-pep", {"disaggregated": True, "decode": {"ep_size": 1}, **SLOW_SENDS})
    serve.delete("pdmix-pep")


async def greedy_texts(app, seed: int) -> tuple[list[str], list[list[int]]]:
    prompts = [prompt(seed + i, length) for i, length in enumerate(PROMPT_LENGTHS)]
    bodies = await asyncio.gather(*(complete(app.base_url, app.model, p) for p in prompts))
    return [text(b) for b in bodies], prompts


@pytest.mark.slow
async def test_decode_ep_with_a_prefill_replica_without_ep(decode_ep_app, reference_llm):
    texts, prompts = await greedy_texts(decode_ep_app, 400)
    assert texts == llm_texts(reference_llm, prompts)
    stats = await all_blocks_free(decode_ep_app.stats)
    assert stats["ep_size"] == EP_SIZE and stats["num_free_blocks"] == stats["num_total_blocks"]
    assert all(rank["num_generation_tokens"] > 0 for rank in stats["ranks"])  # both decode ranks paired
    prefill = await all_blocks_free(prefill_stats("pdmix-dep"))
    assert "ranks" not in prefill and prefill["num_free_blocks"] == prefill["num_total_blocks"]


@pytest.mark.slow
async def test_prefill_ep_with_a_decode_replica_without_ep(prefill_ep_app, reference_llm):
    texts, prompts = await greedy_texts(prefill_ep_app, 500)
    assert texts == llm_texts(reference_llm, prompts)
    decode = await all_blocks_free(prefill_ep_app.stats)
    assert "ranks" not in decode and decode["num_free_blocks"] == decode["num_total_blocks"]
    prefill = await all_blocks_free(prefill_stats("pdmix-pep"))
    assert prefill["ep_size"] == EP_SIZE and prefill["num_free_blocks"] == prefill["num_total_blocks"]
    # Least loaded: overlapping prefills went to both ranks, each sent from the rank that computed it.
    assert all(rank["num_prompt_tokens"] > 0 for rank in prefill["ranks"])
