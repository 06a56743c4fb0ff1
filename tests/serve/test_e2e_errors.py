"""End-to-end error cases, in each API's own shape, against the live app; failed requests leave no blocks."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import openai
import pytest

USER = [{"role": "user", "content": "Hello"}]
SLOW_SCRIPT = "tick " * 60 + "<|im_end|>"
OVERSIZED_CHARS = 5 * 1024 * 1024  # "x " each: 10 MiB of body, above the default 8 MiB limit


@pytest.fixture
def oai(live_app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{live_app.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def claude(live_app) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=live_app.base_url, api_key="unused", max_retries=0)


async def _assert_engine_clean(live_app) -> None:
    for _ in range(200):
        stats = await live_app.engine_stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]


async def test_malformed_json_and_invalid_fields(live_app, oai, claude):
    async with httpx.AsyncClient(base_url=live_app.base_url) as http:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
            resp = await http.post(path, content=b'{"model": ', headers={"content-type": "application/json"})
            assert resp.status_code == 400, path
            assert "Traceback" not in resp.text
        assert (await http.post("/v1/messages", content=b"[")).json()["type"] == "error"
    with pytest.raises(openai.BadRequestError) as exc:
        await oai.chat.completions.create(model=live_app.model, messages=USER, temperature=7.0)
    assert exc.value.body["type"] == "invalid_request_error" and "temperature" in exc.value.body["message"]
    with pytest.raises(anthropic.BadRequestError) as exc:
        await claude.messages.create(model=live_app.model, max_tokens=0, messages=USER)
    assert exc.value.body["error"]["type"] == "invalid_request_error"


async def test_unknown_model_is_404(live_app, oai, claude):
    with pytest.raises(openai.NotFoundError) as exc:
        await oai.chat.completions.create(model="gpt-nope", messages=USER)
    assert "gpt-nope" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="gpt-nope", prompt="x")
    with pytest.raises(anthropic.NotFoundError) as exc:
        await claude.messages.create(model="claude-nope", max_tokens=4, messages=USER)
    assert exc.value.body["error"]["type"] == "not_found_error"


async def test_context_window_exceeded_names_both_numbers(live_app, oai, claude):
    with pytest.raises(openai.BadRequestError) as exc:
        await oai.chat.completions.create(model=live_app.model, messages=USER, max_tokens=live_app.max_model_len)
    message = exc.value.body["message"]
    assert str(live_app.max_model_len) in message and "in the messages" in message
    with pytest.raises(openai.BadRequestError):
        await oai.completions.create(model=live_app.model, prompt=[5] * (live_app.max_model_len + 1), max_tokens=1)
    with pytest.raises(anthropic.BadRequestError) as exc:
        await claude.messages.create(model=live_app.model, max_tokens=live_app.max_model_len, messages=USER)
    assert str(live_app.max_model_len) in exc.value.body["error"]["message"]
    await _assert_engine_clean(live_app)


async def test_overload_returns_429_with_retry_after(live_app, oai):
    """Path: router -> `submit` -> engine replica -> engine core, which replays the `k2ray_test` script as
    engine outputs -> delta channel (the default transport) -> the router's admission bound;
    the slow scripts hold their slots."""
    async def slow() -> int:
        stream = await oai.chat.completions.create(
            model=live_app.model, messages=USER, max_tokens=128, stream=True,
            extra_body={"k2ray_test": {"script": SLOW_SCRIPT, "token_delay_s": 0.05}})
        return len([c async for c in stream])

    busy = [asyncio.create_task(slow()) for _ in range(live_app.max_inflight)]
    await asyncio.sleep(1.0)  # all admitted and streaming
    try:
        with pytest.raises(openai.RateLimitError) as exc:
            await oai.chat.completions.create(model=live_app.model, messages=USER, max_tokens=2)
        assert exc.value.response.headers["retry-after"] == "1"
        assert exc.value.body["type"] == "engine_overloaded_error"
    finally:
        counts = await asyncio.gather(*busy)
    assert all(n > 0 for n in counts)
    await oai.chat.completions.create(model=live_app.model, messages=USER, max_tokens=2)  # admitted again


async def test_engine_failure_is_500_and_frees_blocks(live_app, oai, claude):
    """Path: router -> `submit` -> engine replica -> engine core, whose injected failure fails the real
    engine request as a failed step does -> delta channel (the default transport) -> each API's error shape,
    before and after the stream started."""
    injected = {"k2ray_test": {"fail_after_tokens": 3}, "ignore_eos": True}
    with pytest.raises(openai.InternalServerError) as exc:
        await oai.chat.completions.create(model=live_app.model, messages=USER, max_tokens=64, extra_body=injected)
    assert exc.value.status_code == 500 and "injected" not in str(exc.value.body)
    with pytest.raises(anthropic.InternalServerError) as exc:
        await claude.messages.create(model=live_app.model, max_tokens=64, messages=USER,
                                     extra_body={"k2ray_test": {"fail_after_tokens": 3}})
    assert exc.value.body["error"]["type"] == "api_error"
    # Mid-stream: the stream carries an error event instead of a silent truncation.
    stream = await oai.chat.completions.create(model=live_app.model, messages=USER, max_tokens=64, stream=True,
                                               extra_body={"k2ray_test": {"fail_after_tokens": 40}, "ignore_eos": True})
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await _assert_engine_clean(live_app)


async def test_edge_errors_through_the_live_app(live_app):
    """Unknown routes, a body over the size limit and a schema the grammar compiler refuses, over real HTTP."""
    async with httpx.AsyncClient(base_url=live_app.base_url, timeout=60.0) as http:
        resp = await http.get("/v1/nope")
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
        resp = await http.get("/v1/messages")
        assert resp.status_code == 405 and resp.json()["type"] == "error"
        big = json.dumps({"model": live_app.model, "messages": [{"role": "user", "content": "x " * OVERSIZED_CHARS}]})
        resp = await http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"
        # A valid JSON Schema that xgrammar cannot compile: a 400 without xgrammar's C++ source paths.
        schema = {"type": "object", "properties": {"a": {"$ref": "#/nope"}}, "required": ["a"]}
        resp = await http.post("/v1/chat/completions", json={
            "model": live_app.model, "messages": USER, "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}})
        assert resp.status_code == 400
        message = resp.json()["error"]["message"]
        assert "nope" in message and ".cc" not in message and "/project" not in message
        assert (await http.get("/health")).status_code == 200
    await _assert_engine_clean(live_app)


async def test_prompt_token_id_outside_the_vocabulary_is_a_400(live_app, oai):
    """Real engine path: the core rejects the ids, the router answers 400 (it was a 500 'engine failure')."""
    with pytest.raises(openai.BadRequestError, match=r"prompt token ids must be in \[0, "):
        await oai.completions.create(model=live_app.model, prompt=[1, 2, 10**9], max_tokens=4)
    await _assert_engine_clean(live_app)
