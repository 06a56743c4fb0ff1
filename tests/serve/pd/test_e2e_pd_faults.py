"""Faults in the disaggregated app (2 prefill + 2 decode, slow KV sends, one retry): a prefill core
killed mid-transfer, a stalled prefill, a decode core killed mid-stream and a client gone during the
transfer. Each request ends within a bounded time, with the right tokens or a clear error; no
request hangs; every replica's blocks are free afterwards and the next request succeeds."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.serve.pd.pd_requests import MAX_TOKENS, complete, llm_texts, prompt, text

LONG_PROMPT = 300  # 19 blocks: ~3 s on the slowed wire
BOUND_S = 60.0  # every faulty request ends within this
POLL_S = 0.05
pytestmark = pytest.mark.faults

RECOVERY_TIMEOUT_S = 180.0  # Serve replaces a replica whose core died
RECOVERY_POLL_S = 0.5


async def wait_for(predicate, what: str, timeout_s: float = BOUND_S):
    deadline = time.monotonic() + timeout_s
    while not (found := await predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_S)
    return found


async def sending_prefill(app) -> dict | None:
    try:
        replicas = await app.replica_stats("prefill")
    except LookupError:
        return None
    for stats in replicas:
        if stats["num_kv_transfers_in_flight"]:
            return stats
    return None


def is_idle(stats: dict) -> bool:
    return (stats["num_free_blocks"] == stats["num_total_blocks"] and not stats["num_kv_transfers_in_flight"]
            and not stats.get("num_held_prefills") and not stats["num_routed_requests"])


class Settled:
    """Every live replica healthy and idle with all its blocks free (2 of each again); the last stats
    seen are kept for the failure message."""

    def __init__(self, app) -> None:
        self.app = app
        self.last: object = "no stats yet"

    async def __call__(self) -> bool:
        try:
            pools = {pool: await self.app.replica_stats(pool) for pool in ("prefill", "decode")}
        except Exception as exc:  # a replica being replaced
            self.last = repr(exc)
            await asyncio.sleep(RECOVERY_POLL_S)
            return False
        self.last = pools
        return all(len(p) == 2 for p in pools.values()) and all(is_idle(s) for p in pools.values() for s in p)


async def wait_settled(app, what: str) -> None:
    settled = Settled(app)
    try:
        await wait_for(settled, what, RECOVERY_TIMEOUT_S)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {settled.last}") from None


async def check_recovered(app, reference_llm) -> None:
    await wait_settled(app, "all replicas idle with all blocks free")
    token_ids = prompt(1234, 40)
    assert text(await complete(app.base_url, app.model, token_ids)) == llm_texts(reference_llm, [token_ids])[0]


@pytest.fixture(autouse=True)
async def idle_before(pd_2x2_app):
    """Each fault starts from an idle app: a leak left by an earlier test fails here, not as a hang later."""
    await wait_settled(pd_2x2_app, "the 2+2 app idle before the fault")


async def test_prefill_core_killed_mid_transfer_retries_elsewhere(pd_2x2_app, reference_llm):
    token_ids = prompt(501, LONG_PROMPT)
    request = asyncio.ensure_future(complete(pd_2x2_app.base_url, pd_2x2_app.model, token_ids))
    victim = await wait_for(lambda: sending_prefill(pd_2x2_app), "a KV transfer under way")
    os.kill(victim["pid"], signal.SIGKILL)
    body = await asyncio.wait_for(request, BOUND_S)  # the retry on the other prefill replica
    assert text(body) == llm_texts(reference_llm, [token_ids])[0]
    await check_recovered(pd_2x2_app, reference_llm)


async def test_prefill_timeout_ends_with_a_clear_503(pd_2x2_app, reference_llm):
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        response = await client.post(f"{pd_2x2_app.base_url}/v1/completions", json={
            "model": pd_2x2_app.model, "prompt": prompt(502, 60), "max_tokens": MAX_TOKENS,
            "k2ray_test": {"prefill_stall_s": 30}})
    assert response.status_code == 503
    error = response.json()["error"]
    assert "prefill" in error["message"] and "Traceback" not in response.text
    await check_recovered(pd_2x2_app, reference_llm)


async def test_decode_core_killed_mid_stream_ends_the_stream(pd_2x2_app, reference_llm):
    events = []
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        async with client.stream("POST", f"{pd_2x2_app.base_url}/v1/completions", json={
                "model": pd_2x2_app.model, "prompt": prompt(503, 30), "max_tokens": 900, "ignore_eos": True,
                "stream": True, "temperature": 0}) as response:
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    break
            busy = [s for s in await pd_2x2_app.replica_stats("decode") if s["num_running"]]
            assert len(busy) == 1
            os.kill(busy[0]["pid"], signal.SIGKILL)
            async for line in lines:
                events.append(line)
    assert any('"error"' in line for line in events), events[-3:]
    await check_recovered(pd_2x2_app, reference_llm)


async def test_client_gone_during_transfer_frees_both_sides(pd_2x2_app, reference_llm):
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        request = asyncio.ensure_future(client.post(f"{pd_2x2_app.base_url}/v1/completions", json={
            "model": pd_2x2_app.model, "prompt": prompt(504, LONG_PROMPT), "max_tokens": MAX_TOKENS}))
        await wait_for(lambda: sending_prefill(pd_2x2_app), "a KV transfer under way")
        request.cancel()  # the connection closes mid-transfer
        with pytest.raises(asyncio.CancelledError):
            await request
    await check_recovered(pd_2x2_app, reference_llm)
