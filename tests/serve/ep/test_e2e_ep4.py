"""The colocated app with `engine: {ep_size: 4}`: four rank cores of 4 routed experts each (the tiny model has
16). Greedy outputs over HTTP equal the in-process single engine's, with fewer concurrent requests than ranks
at the end so some ranks step with empty batches. Opt-in (`pytest -m ep_wide tests/serve/ep`): four more
engine processes on a 2-core box take about a minute to start."""

from __future__ import annotations

import asyncio

import pytest

from tests.serve.ep.conftest import EP_ENGINE, deploy
from tests.serve.ep.test_e2e_ep import PROMPT_LENGTHS, all_blocks_free
from tests.serve.pd.pd_requests import complete, llm_texts, prompt, text

WIDE_EP_SIZE = 4

pytestmark = pytest.mark.ep_wide


@pytest.fixture(scope="module")
def ep4_app(live_app):
    from ray import serve

    yield deploy(live_app, "ep4", {"engine": {**EP_ENGINE, "ep_size": WIDE_EP_SIZE, "num_cpus": 0.1}})
    serve.delete("ep4")


async def test_ep4_greedy_identical_to_one_engine(ep4_app, reference_llm):
    prompts = [prompt(400 + seed, length) for seed, length in enumerate(PROMPT_LENGTHS)]
    expected = llm_texts(reference_llm, prompts)
    bodies = await asyncio.gather(*(complete(ep4_app.base_url, ep4_app.model, p) for p in prompts))
    assert [text(b) for b in bodies] == expected
    pair = await asyncio.gather(*(complete(ep4_app.base_url, ep4_app.model, p) for p in prompts[:2]))
    assert [text(b) for b in pair] == expected[:2]  # two ranks busy, two stepping empty
    stats = await all_blocks_free(ep4_app.stats)
    assert stats["ep_size"] == WIDE_EP_SIZE and len(stats["ranks"]) == WIDE_EP_SIZE
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert all(rank["num_generation_tokens"] > 0 for rank in stats["ranks"])
