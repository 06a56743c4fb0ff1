"""Per-key limits through the router app (the same RateLimiter the shared Ray actor holds, in process):
exactly N requests pass a limit of N/min, the x-ratelimit-* headers count down, 429 with Retry-After,
tokens reserved as prompt + max_tokens and corrected to actual, concurrency, and budgets that stop
spending at the budget (402 insufficient_quota)."""

from __future__ import annotations

import asyncio

import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import BUILTIN_PLANS, DEFAULT_PLAN, format_usd
from k2ray.serve.http.rate_limits import WINDOW_S, KeyLimits, RateLimiter, Reservation

from .billed_app import CKPT, billed_app

USER = [{"role": "user", "content": "hi"}]
PLAN = BUILTIN_PLANS[DEFAULT_PLAN]


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


@pytest.fixture
def billed(tokenizer, tmp_path):
    app = billed_app(tokenizer, tmp_path, script="a b c d e f g h<|im_end|>")
    yield app
    app.billing.close()


async def _num_prompt_tokens(billed) -> int:
    """The prompt length of `_chat()`, as an unlimited key's request reports it (not billed to the test's key)."""
    _, unlimited = billed.create_key("probe")
    async with billed.http(unlimited) as http:
        return (await http.post("/v1/chat/completions", json=_chat())).json()["usage"]["prompt_tokens"]


def _chat(max_tokens: int = 4, **extra) -> dict:
    return {"model": "k2-tiny", "messages": USER, "max_tokens": max_tokens, **extra}


async def test_exactly_n_requests_pass_a_limit_of_n_per_minute(billed):
    _, secret = billed.create_key(rpm=3)
    async with billed.http(secret) as http:
        responses = [await http.post("/v1/chat/completions", json=_chat()) for _ in range(5)]
        billed.clock.now += WINDOW_S / 2
        still_refused = await http.post("/v1/chat/completions", json=_chat())
        billed.clock.now += WINDOW_S / 2  # the first admissions leave the window
        again = await http.post("/v1/chat/completions", json=_chat())
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == ["2", "1", "0", "0", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in responses)
    refused = responses[3]
    assert int(refused.headers["retry-after"]) == WINDOW_S
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert still_refused.status_code == 429 and int(still_refused.headers["retry-after"]) == WINDOW_S / 2
    assert again.status_code == 200 and again.headers["x-ratelimit-remaining-requests"] == "2"
    assert len(billed.engine.started) == 4
    assert await billed.records() == 4  # refused requests never ran: no record


async def test_anthropic_rate_limit_error_shape(billed):
    _, secret = billed.create_key(rpm=1)
    async with billed.http(secret, header="x-api-key") as http:
        first = await http.post("/v1/messages", json=_chat())
        second = await http.post("/v1/messages", json=_chat())
    assert first.status_code == 200 and second.status_code == 429
    assert second.json()["error"]["type"] == "rate_limit_error" and "retry-after" in second.headers


async def test_tokens_are_reserved_at_admission_and_corrected_to_actual(billed):
    num_prompt = await _num_prompt_tokens(billed)
    reserved = num_prompt + 50  # prompt + max_tokens
    tpm = 3 * reserved - 1  # three reservations do not fit; two real usages and a reservation do
    _, secret = billed.create_key(tpm=tpm)
    _, tiny = billed.create_key("tiny", tpm=10)
    async with billed.http(secret) as http:
        responses = [await http.post("/v1/chat/completions", json=_chat(max_tokens=50)) for _ in range(3)]
    async with billed.http(tiny) as http:
        too_big = await http.post("/v1/chat/completions", json=_chat(max_tokens=50))
    used = [r.json()["usage"]["total_tokens"] for r in responses]
    assert [r.status_code for r in responses] == [200, 200, 200]  # fits only because of the correction
    assert all(r.headers["x-ratelimit-limit-tokens"] == str(tpm) for r in responses)
    # At admission the whole reservation counts; by the next admission the last one holds what it used.
    remaining = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in responses]
    assert remaining == [tpm - reserved, tpm - used[0] - reserved, tpm - used[0] - used[1] - reserved]
    assert too_big.status_code == 429 and too_big.json()["error"]["type"] == "tokens"
    assert "exceeds the limit: lower max_tokens" in too_big.json()["error"]["message"]


async def test_concurrency_limit(tokenizer, tmp_path):
    billed = billed_app(tokenizer, tmp_path, script="tick " * 50 + "<|im_end|>", token_delay_s=0.02)
    try:
        _, secret = billed.create_key(concurrency=1)
        async with billed.http(secret) as http:
            slow = asyncio.create_task(http.post("/v1/chat/completions", json=_chat(max_tokens=40)))
            while not billed.engine.started:
                await asyncio.sleep(0.01)
            busy = await http.post("/v1/chat/completions", json=_chat())
            assert (await slow).status_code == 200
            after = await http.post("/v1/chat/completions", json=_chat())
        assert busy.status_code == 429 and "concurrent" in busy.json()["error"]["message"]
        assert after.status_code == 200
    finally:
        billed.billing.close()


async def test_budget_stops_spending_at_the_budget(billed):
    script_len = len(billed.engine.default_script)
    num_prompt = await _num_prompt_tokens(billed)
    # With max_tokens = the script's length and no cache hits, a request costs exactly its worst case.
    per_request = num_prompt * PLAN.input_micro_usd_per_mtok + script_len * PLAN.output_micro_usd_per_mtok
    key, secret = billed.create_key(budget_usd=format_usd(2 * per_request))
    statuses, bodies = [], []
    async with billed.http(secret) as http:
        for _ in range(4):
            resp = await http.post("/v1/chat/completions", json=_chat(max_tokens=script_len))
            statuses.append(resp.status_code)
            bodies.append(resp.json())
    assert statuses == [200, 200, 402, 402]
    assert bodies[2]["error"]["type"] == bodies[2]["error"]["code"] == "insufficient_quota"
    assert "is spent" in bodies[2]["error"]["message"]
    await billed.records()
    assert billed.billing.ledger.spent_pico_usd(key.key_id) == 2 * per_request  # to the budget, not beyond


async def test_budget_refuses_a_request_that_could_overrun_it(billed):
    key, secret = billed.create_key(budget_usd="0.0005")
    async with billed.http(secret, header="x-api-key") as http:
        big = await http.post("/v1/messages", json=_chat(max_tokens=400))  # could cost over $0.00088 (400 x $2.222/M)
        small = await http.post("/v1/messages", json=_chat(max_tokens=4))
    assert big.status_code == 402 and big.json()["error"]["type"] == "billing_error"
    assert "lower max_tokens" in big.json()["error"]["message"]
    assert small.status_code == 200


def test_limiter_counts_one_window_for_every_caller():
    """Several routers sharing one RateLimiter see one count (what the named actor gives all replicas)."""
    now = [0.0]
    limiter = RateLimiter(lambda _: 0, clock=lambda: now[0])
    res = Reservation("k", KeyLimits(rpm=4, tpm=100, concurrency=3), num_tokens=20, max_cost_pico_usd=0)
    decisions = [limiter.admit(res) for _ in range(5)]
    assert [d.is_admitted for d in decisions] == [True, True, True, False, False]
    assert decisions[3].refusal == "concurrency"
    limiter.finish(decisions[0].admission_id, num_tokens=5, cost_pico_usd=7)
    limiter.finish(decisions[0].admission_id, num_tokens=5, cost_pico_usd=7)  # idempotent
    fourth = limiter.admit(res)
    assert fourth.is_admitted and fourth.remaining_tokens == 100 - 5 - 3 * 20 and fourth.remaining_requests == 0
    assert limiter.admit(res).refusal == "requests"
    assert limiter.spent_pico_usd("k") == 7 and limiter.num_inflight == 3
    now[0] += WINDOW_S
    for d in (decisions[1], decisions[2], fourth):
        limiter.finish(d.admission_id, 0, 0)
    assert limiter.admit(res).remaining_requests == 3
