"""Metering: one ledger record per request, equal to the usage the client received, priced exactly;
cancelled streams billed for what was delivered, failures before any output billed nothing."""

from __future__ import annotations

import asyncio
import json

import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import BUILTIN_PLANS, DEFAULT_PLAN, RequestStatus, UsageCounts, format_usd, price_counts

from .billed_app import CKPT, billed_app

NUM_CACHED = 4
USER = [{"role": "user", "content": "hello there, how are you today?"}]
PLAN = BUILTIN_PLANS[DEFAULT_PLAN]
LONG_SCRIPT = "<think>" + "mull " * 20 + "</think>" + "word " * 40 + "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


@pytest.fixture
def billed(tokenizer, tmp_path):
    app = billed_app(tokenizer, tmp_path, num_cached_tokens=NUM_CACHED)
    yield app
    app.billing.close()


def _openai_counts(usage: dict) -> UsageCounts:
    return UsageCounts(num_prompt_tokens=usage["prompt_tokens"],
                       num_cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
                       num_completion_tokens=usage["completion_tokens"],
                       num_reasoning_tokens=usage["completion_tokens_details"]["reasoning_tokens"])


def _assert_billed(record, counts: UsageCounts, status: RequestStatus = RequestStatus.OK) -> None:
    assert record.status is status
    assert record.counts == counts
    assert record.costs == price_counts(PLAN, counts)
    assert record.plan == DEFAULT_PLAN


def _sse_payloads(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_chat_record_equals_the_usage_the_client_received(billed):
    _, secret = billed.create_key()
    async with billed.http(secret) as http:
        resp = (await http.post("/v1/chat/completions",
                                json={"model": "k2-tiny", "messages": USER, "max_tokens": 64})).json()
        streamed = await http.post("/v1/chat/completions", json={
            "model": "k2-tiny", "messages": USER, "max_tokens": 64, "stream": True,
            "stream_options": {"include_usage": True}})
    counts = _openai_counts(resp["usage"])
    assert counts.num_cached_tokens == NUM_CACHED and counts.num_reasoning_tokens > 0
    _assert_billed(await billed.record(resp["id"]), counts)
    payloads = _sse_payloads(streamed.text)
    _assert_billed(await billed.record(payloads[0]["id"]), _openai_counts(payloads[-1]["usage"]))


async def test_completions_with_prompts_and_n_are_billed_as_reported(billed):
    _, secret = billed.create_key()
    async with billed.http(secret) as http:
        resp = (await http.post("/v1/completions", json={
            "model": "k2-tiny", "prompt": ["one two three four five", "six seven eight nine ten"], "n": 2,
            "max_tokens": 5})).json()
    counts = _openai_counts(resp["usage"])
    assert counts.num_completion_tokens == 4 * 5 and counts.num_cached_tokens == 2 * NUM_CACHED
    _assert_billed(await billed.record(resp["id"]), counts)


async def test_anthropic_record_matches_message_and_stream_usage(billed):
    _, secret = billed.create_key()
    body = {"model": "k2-tiny", "messages": USER, "max_tokens": 64}
    async with billed.http(secret, header="x-api-key") as http:
        msg = (await http.post("/v1/messages", json=body)).json()
        streamed = await http.post("/v1/messages", json={**body, "stream": True})
    for request_id, usage in ((msg["id"], msg["usage"]),
                              (_sse_payloads(streamed.text)[0]["message"]["id"], _sse_payloads(streamed.text)[-2]["usage"])):
        record = await billed.record(request_id)
        assert record.counts.num_uncached_tokens == usage["input_tokens"]
        assert record.counts.num_cached_tokens == usage["cache_read_input_tokens"] == NUM_CACHED
        assert record.counts.num_completion_tokens == usage["output_tokens"]
        assert record.counts.num_reasoning_tokens > 0
        assert record.costs == price_counts(PLAN, record.counts)


async def _stream_then_disconnect(app, secret: str, body: dict, num_frames: int) -> list[dict]:
    """A streaming chat request whose client goes away after `num_frames` body writes."""
    sent: list[dict] = []
    enough = asyncio.Event()
    request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if request:
            return request.pop()
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message)
            if len(sent) >= num_frames:
                enough.set()
                await asyncio.sleep(0.2)  # the client is gone: this write never completes in time

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "server": ("router", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {secret}".encode())]}
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return [p for m in sent for p in _sse_payloads(m["body"].decode())]


async def test_cancelled_stream_is_billed_for_what_was_delivered(tokenizer, tmp_path):
    billed = billed_app(tokenizer, tmp_path, script=LONG_SCRIPT, num_cached_tokens=NUM_CACHED, token_delay_s=0.01)
    try:
        _, secret = billed.create_key()
        body = {"model": "k2-tiny", "messages": USER, "max_tokens": 200, "stream": True}
        payloads = await _stream_then_disconnect(billed.app, secret, body, num_frames=5)
        record = await billed.record(payloads[0]["id"])
        num_script = len(billed.engine.default_script)
        delivered = sum(1 for p in payloads for c in p["choices"]
                        if c["delta"].get("content") or c["delta"].get("reasoning_content"))
        assert record.status is RequestStatus.CANCELLED
        assert billed.engine.aborted == billed.engine.started
        # Billed for the tokens the router decoded and sent, not the script's whole length.
        assert delivered <= record.counts.num_completion_tokens < num_script
        assert record.counts.num_prompt_tokens > 0 and record.counts.num_cached_tokens == NUM_CACHED
        assert record.costs == price_counts(PLAN, record.counts)
    finally:
        billed.billing.close()


async def test_failure_before_any_output_bills_nothing(billed):
    _, secret = billed.create_key()
    body = {"model": "k2-tiny", "messages": USER, "max_tokens": 64, "k2ray_test": {"fail_after_tokens": 0}}
    async with billed.http(secret) as http:
        resp = await http.post("/v1/chat/completions", json=body)
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
        usage = (await http.get("/v1/usage")).json()
    assert resp.status_code == 500 and streamed.status_code == 500
    report = billed.billing.ledger.report()
    assert report.totals.requests == 2 and report.totals.cost_pico_usd == 0
    assert usage["totals"] == {"requests": 2, "input_tokens": 0, "cached_tokens": 0, "output_tokens": 0,
                               "reasoning_tokens": 0, "web_searches": 0, "cost_usd": "0"}


async def test_failures_after_output(billed):
    """A failed stream is billed for the tokens it delivered; a failed non-stream delivered nothing."""
    _, secret = billed.create_key()
    body = {"model": "k2-tiny", "messages": USER, "max_tokens": 64, "k2ray_test": {"fail_after_tokens": 3}}
    async with billed.http(secret) as http:
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
        resp = await http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 500
    payloads = _sse_payloads(streamed.text)
    assert "error" in payloads[-1]
    stream_record = await billed.record(payloads[0]["id"])
    assert stream_record.status is RequestStatus.FAILED and stream_record.counts.num_completion_tokens == 3
    assert stream_record.costs == price_counts(PLAN, stream_record.counts)
    report = billed.billing.ledger.report()
    assert report.totals.requests == 2 and report.totals.output_tokens == 3


async def test_usage_endpoint_totals_equal_the_clients_usage(billed):
    key, secret = billed.create_key()
    _, other = billed.create_key("other")
    received: list[UsageCounts] = []
    async with billed.http(secret) as http:
        for max_tokens in (3, 5, 64):
            resp = await http.post("/v1/chat/completions",
                                   json={"model": "k2-tiny", "messages": USER, "max_tokens": max_tokens})
            received.append(_openai_counts(resp.json()["usage"]))
        async with billed.http(other) as other_http:
            await other_http.post("/v1/chat/completions", json={"model": "k2-tiny", "messages": USER, "max_tokens": 7})
        usage = (await http.get("/v1/usage")).json()
        bad_date = await http.get("/v1/usage", params={"since": "yesterday"})
    cost = sum(price_counts(PLAN, c).total_pico_usd for c in received)
    assert usage["key_id"] == key.key_id
    assert usage["totals"] == {
        "requests": 3, "input_tokens": sum(c.num_uncached_tokens for c in received),
        "cached_tokens": 3 * NUM_CACHED, "output_tokens": sum(c.num_completion_tokens for c in received),
        "reasoning_tokens": sum(c.num_reasoning_tokens for c in received), "web_searches": 0,
        "cost_usd": format_usd(cost)}
    assert [d["requests"] for d in usage["days"]] == [3]
    assert bad_date.status_code == 400 and bad_date.json()["error"]["param"] == "since"


async def test_admin_usage_spans_keys(billed):
    from .billed_app import ADMIN_TOKEN

    keys = [billed.create_key(name) for name in ("a", "b")]
    for _, secret in keys:
        async with billed.http(secret) as http:
            await http.post("/v1/chat/completions", json={"model": "k2-tiny", "messages": USER, "max_tokens": 2})
    async with billed.http(ADMIN_TOKEN) as admin:
        everyone = (await admin.get("/admin/usage")).json()
        one = (await admin.get("/admin/usage", params={"key_id": keys[0][0].key_id})).json()
    assert everyone["totals"]["requests"] == 2 and set(everyone["keys"]) == {k.key_id for k, _ in keys}
    assert one["totals"]["requests"] == 1 and "keys" not in one


async def test_shutdown_writes_every_queued_record(tokenizer, tmp_path):
    billed = billed_app(tokenizer, tmp_path)
    _, secret = billed.create_key()
    async with billed.app.router.lifespan_context(billed.app):
        async with billed.http(secret) as http:
            ids = [(await http.post("/v1/chat/completions", json={
                "model": "k2-tiny", "messages": USER, "max_tokens": 2})).json()["id"] for _ in range(3)]
    # The app's shutdown closed the writer: everything queued is in the ledger.
    with pytest.raises(RuntimeError):
        billed.billing.writer.submit(None)
    from k2ray.billing import Ledger

    ledger = Ledger.open(billed.billing.config.ledger)
    assert all(ledger.get(i) is not None for i in ids)
    ledger.close()


@pytest.fixture(scope="module")
def postgres_dsn():
    from tests.billing.postgres_server import INSTALL_HINT, find_bin_dir, postgres_server

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")
    with postgres_server(bin_dir) as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_dsn(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    import sqlalchemy as sa

    server = request.getfixturevalue("postgres_dsn")
    name = f"k2ray_router_{tmp_path.name.replace('-', '_').lower()}"
    engine = sa.create_engine(server.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


async def test_concurrent_mix_leaves_exactly_one_record_per_request(tokenizer, tmp_path, ledger_dsn):
    """Streams and not, failures before and after output, cancelled streams, all at once: one record each,
    and the ledger's totals equal the usage the clients received plus what the cancelled ones were sent."""
    billed = billed_app(tokenizer, tmp_path, script=LONG_SCRIPT, num_cached_tokens=NUM_CACHED,
                        token_delay_s=0.001, max_inflight=64, ledger=ledger_dsn)
    try:
        _, secret = billed.create_key(rpm=1000, concurrency=64)  # limited: every exit path must finish its admission
        body = {"model": "k2-tiny", "messages": USER, "max_tokens": 40}
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}

        async def one(i: int, http) -> tuple[str, UsageCounts | None]:
            kind = i % 5
            if kind == 4:  # a client that leaves mid-stream
                payloads = await _stream_then_disconnect(billed.app, secret, {**body, "stream": True}, 3)
                return payloads[0]["id"], None
            fail = {"k2ray_test": {"fail_after_tokens": 0 if i % 10 == 3 else 5}} if kind == 3 else {}
            resp = await http.post("/v1/chat/completions", json={**(stream if kind % 2 else body), **fail})
            if kind == 3:
                return resp.headers.get("x-request-id", ""), None
            if kind == 1:
                payloads = _sse_payloads(resp.text)
                return payloads[0]["id"], _openai_counts(payloads[-1]["usage"])
            return resp.json()["id"], _openai_counts(resp.json()["usage"])

        async with billed.http(secret) as http:
            results = await asyncio.gather(*(one(i, http) for i in range(50)))
        report_requests = await billed.records()
        assert report_requests == 50
        received = [(rid, counts) for rid, counts in results if counts is not None]
        for rid, counts in received:
            _assert_billed(await billed.record(rid), counts)
        cancelled = [await billed.record(rid) for (rid, counts), i in zip(results, range(50), strict=True)
                     if i % 5 == 4]
        assert all(r.status is RequestStatus.CANCELLED and r.counts.num_completion_tokens > 0 for r in cancelled)
        report = billed.billing.ledger.report()
        failed = [r for r in _all_records(billed) if r.status is RequestStatus.FAILED]
        assert len(failed) == 10 and sum(r.counts.num_completion_tokens for r in failed) == 5 * 5
        expected_output = (sum(c.num_completion_tokens for _, c in received)
                           + sum(r.counts.num_completion_tokens for r in cancelled) + 5 * 5)
        assert report.totals.output_tokens == expected_output
        assert report.totals.cost_pico_usd == sum(r.costs.total_pico_usd for r in _all_records(billed))
        assert billed.billing.limiter.limiter.num_inflight == 0
    finally:
        billed.billing.close()


def _all_records(billed) -> list:
    import sqlalchemy as sa

    from k2ray.billing.schema import usage

    with billed.billing.ledger.engine.connect() as conn:
        ids = [row.request_id for row in conn.execute(sa.select(usage.c.request_id))]
    return [billed.billing.ledger.get(i) for i in ids]
