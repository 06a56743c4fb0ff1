"""Billing on the live app: two router replicas with API keys, one SQLite ledger and the shared limits actor,
driven by the openai and anthropic SDKs."""

from __future__ import annotations

import asyncio
import time

import anthropic
import httpx
import openai
import pytest

from k2ray.billing import BUILTIN_PLANS, DEFAULT_PLAN, Ledger, UsageCounts, format_usd, price_counts
from k2ray.model.default_checkpoint import tiny_checkpoint_dir

from .conftest import E2E_ENGINE

BILLED_APP = "k2ray-billed"
BILLED_PREFIX = "/billed"
ADMIN_TOKEN = "e2e-admin-token"
PLAN = BUILTIN_PLANS[DEFAULT_PLAN]
NO_THINKING = {"thinking": {"type": "disabled"}, "ignore_eos": True}
LEDGER_TIMEOUT_S = 30.0
# Per SDK request (the SDKs default to 600 s): a request the server never answers fails its test, named.
REQUEST_TIMEOUT_S = 120.0
# A prefix long enough to fill several KV blocks, repeated: the second request hits the prefix cache.
LONG_PREFIX = " ".join(f"fact {i}: the sky over city {i} is clear." for i in range(40))


@pytest.fixture(scope="module")
def billed(live_app, tmp_path_factory):
    import ray
    from ray import serve

    from k2ray.serve.app import build_app
    from k2ray.serve.args import load_serve_args
    from k2ray.serve.http.limits_actor import limits_actor_name

    ledger = str(tmp_path_factory.mktemp("billing") / "ledger.db")
    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "app_name": BILLED_APP, "route_prefix": BILLED_PREFIX,
        "served_model_name": "k2-tiny",
        "engine": {**E2E_ENGINE, "num_cpus": 0.5},
        "router": {"num_replicas": 2, "num_cpus": 0.25, "channel_host": "127.0.0.1", "auth": True,
                   "admin_token": ADMIN_TOKEN},
        "billing": {"ledger": ledger, "flush_interval_s": 0.05},
    })
    serve.run(build_app(args), name=BILLED_APP, route_prefix=BILLED_PREFIX)
    base = live_app.base_url.rstrip("/") + BILLED_PREFIX
    assert httpx.get(f"{base}/health").status_code == 200
    yield base, ledger
    serve.delete(BILLED_APP)
    ray.kill(ray.get_actor(limits_actor_name(BILLED_APP), namespace="serve"))


def _create_key(base: str, **limits) -> tuple[str, str]:
    resp = httpx.post(f"{base}/admin/keys", json={"name": "e2e", **limits},
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]["key_id"], resp.json()["secret"]


def _openai(base: str, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, timeout=REQUEST_TIMEOUT_S)


def _anthropic(base: str, secret: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key=secret, max_retries=0, timeout=REQUEST_TIMEOUT_S)


async def _records(ledger_path: str, request_ids: list[str]) -> dict:
    """The requests' records once both replicas' writers have written them."""
    ledger = Ledger.open(ledger_path)
    deadline = time.monotonic() + LEDGER_TIMEOUT_S
    try:
        while True:
            records = {i: ledger.get(i) for i in request_ids}
            if all(records.values()) or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.1)
    finally:
        ledger.close()


def _counts(usage) -> UsageCounts:
    return UsageCounts(num_prompt_tokens=usage.prompt_tokens,
                       num_cached_tokens=usage.prompt_tokens_details.cached_tokens,
                       num_completion_tokens=usage.completion_tokens,
                       num_reasoning_tokens=usage.completion_tokens_details.reasoning_tokens)


async def test_keys_are_required_and_revocable(billed):
    base, _ = billed
    with pytest.raises(openai.AuthenticationError):
        await _openai(base, "sk-wrong.key").models.list()
    claude = _anthropic(base, "sk-wrong.key")
    with pytest.raises(anthropic.AuthenticationError):
        await claude.messages.create(model="k2-tiny", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert httpx.get(f"{base}/admin/keys").status_code == 401
    key_id, secret = _create_key(base)
    assert [m.id async for m in _openai(base, secret).models.list()] == ["k2-tiny"]
    claude = _anthropic(base, secret)
    msg = await claude.messages.create(model="k2-tiny", max_tokens=4, messages=[{"role": "user", "content": "x"}],
                                       extra_body=NO_THINKING)
    assert msg.usage.output_tokens == 4
    revoked = httpx.post(f"{base}/admin/keys/{key_id}/revoke", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert revoked.status_code == 200
    # The revoking replica forgets the key at once, the other within key_cache_ttl_s.
    deadline = time.monotonic() + 15
    while True:
        try:
            await _openai(base, secret).models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "a revoked key kept working"
        await asyncio.sleep(0.5)


async def test_cache_hits_are_billed_at_the_cache_hit_price(billed):
    base, ledger = billed
    key_id, secret = _create_key(base)
    client = _openai(base, secret)
    responses = []
    for question in ("What is fact 1?", "What is fact 2?"):
        responses.append(await client.chat.completions.create(
            model="k2-tiny", messages=[{"role": "system", "content": LONG_PREFIX}, {"role": "user", "content": question}],
            max_tokens=3, extra_body=NO_THINKING))
    first, second = (_counts(r.usage) for r in responses)
    assert first.num_cached_tokens == 0 < second.num_cached_tokens < second.num_prompt_tokens
    records = await _records(ledger, [r.id for r in responses])
    for resp, counts in zip(responses, (first, second), strict=True):
        record = records[resp.id]
        assert record.counts == counts and record.key_id == key_id
        assert record.costs.cached_input_pico_usd == counts.num_cached_tokens * PLAN.cached_input_micro_usd_per_mtok
        assert record.costs.input_pico_usd == counts.num_uncached_tokens * PLAN.input_micro_usd_per_mtok
    # The usage endpoint reports exactly the same totals (read after both replicas have written).
    usage = httpx.get(f"{base}/v1/usage", headers={"authorization": f"Bearer {secret}"}).json()
    assert usage["totals"]["cached_tokens"] == second.num_cached_tokens
    assert usage["totals"]["input_tokens"] == first.num_uncached_tokens + second.num_uncached_tokens
    cost = price_counts(PLAN, first).total_pico_usd + price_counts(PLAN, second).total_pico_usd
    assert usage["totals"]["cost_usd"] == format_usd(cost)


async def test_limits_hold_across_two_router_replicas(billed):
    base, _ = billed
    _, secret = _create_key(base, rpm=5)
    async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {secret}"}) as http:
        body = {"model": "k2-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **NO_THINKING}
        responses = [await http.post("/v1/chat/completions", json=body) for _ in range(8)]
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 3
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses[:5]] == ["4", "3", "2", "1", "0"]
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses[5:])


async def test_budget_stops_spending_across_replicas(billed):
    base, ledger = billed
    max_tokens = 4
    budget = "0.0001"  # a few requests' worth
    key_id, secret = _create_key(base, budget_usd=budget)
    client = _openai(base, secret)
    num_ok = 0
    for _ in range(40):
        try:
            await client.chat.completions.create(model="k2-tiny", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=max_tokens, extra_body=NO_THINKING)
            num_ok += 1
        except openai.APIStatusError as err:
            assert err.status_code == 402 and err.body["code"] == "insufficient_quota"
            break
    assert 0 < num_ok < 40
    usage = httpx.get(f"{base}/v1/usage", headers={"authorization": f"Bearer {secret}"}).json()
    deadline = time.monotonic() + LEDGER_TIMEOUT_S
    while usage["totals"]["requests"] < num_ok and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        usage = httpx.get(f"{base}/v1/usage", headers={"authorization": f"Bearer {secret}"}).json()
    assert usage["totals"]["requests"] == num_ok
    from decimal import Decimal

    assert Decimal(usage["totals"]["cost_usd"]) <= Decimal(budget)
