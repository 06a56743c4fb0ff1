"""A rank of a colocated EP replica killed mid-stream: every request on the replica (the dead rank's and the
survivor's) ends within a bounded time with a clear error, Serve replaces the replica (its health check fails
once a rank is gone), and the new replica serves the same greedy tokens with all its blocks free after."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.serve.ep.conftest import EP_SIZE, deploy
from tests.serve.pd.pd_requests import complete, llm_texts, prompt, text

# Opt-in (`pytest -m ep_faults tests/serve/ep`): the replica restart costs a minute of the default run, and
# the rank-death path it checks is also tested through `LLM` (tests/engine/ep/test_ep_llm.py) by default.
pytestmark = pytest.mark.ep_faults

BOUND_S = 60.0  # every request of the killed replica ends within this
RECOVERY_TIMEOUT_S = 240.0  # Serve replaces the replica: its health check period, then two ranks load
POLL_S = 0.5
NUM_STREAMS = 4


async def stream(base: str, model: str, seed: int, started: asyncio.Event) -> list[str]:
    lines = []
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        async with client.stream("POST", f"{base}/v1/completions", json={
                "model": model, "prompt": prompt(seed, 20), "max_tokens": 900, "ignore_eos": True, "stream": True,
                "temperature": 0}) as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith("data: {"):
                    started.set()
    return lines


async def replica_stats(app) -> dict | None:
    try:
        return await asyncio.wait_for(app.stats(), POLL_S * 10)
    except Exception:  # noqa: BLE001 - the replica is being replaced
        return None


async def test_killed_rank_ends_the_replicas_requests_and_serve_replaces_it(live_app, reference_llm):
    from ray import serve

    app = deploy(live_app, "epkill", {})
    try:
        started = [asyncio.Event() for _ in range(NUM_STREAMS)]
        streams = [asyncio.ensure_future(stream(app.base_url, app.model, 600 + i, started[i]))
                   for i in range(NUM_STREAMS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), BOUND_S)
        stats = await app.stats()
        assert all(rank["num_running"] for rank in stats["ranks"])  # the streams went to both ranks
        old_pids = stats["pids"]
        assert len(old_pids) == EP_SIZE
        os.kill(old_pids[1], signal.SIGKILL)
        for lines in await asyncio.wait_for(asyncio.gather(*streams), BOUND_S):
            assert any('"error"' in line for line in lines), lines[-3:]
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while (stats := await replica_stats(app)) is None or set(stats["pids"]) & set(old_pids):
            assert time.monotonic() < deadline, "the replica was not replaced"
            await asyncio.sleep(POLL_S)
        token_ids = prompt(700, 40)
        assert text(await complete(app.base_url, app.model, token_ids)) == llm_texts(reference_llm, [token_ids])[0]
        stats = await app.stats()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
    finally:
        serve.delete("epkill")
