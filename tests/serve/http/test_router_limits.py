"""Request bounds at the router edge: body bytes (413), JSON depth, prompts, n and engine requests per
request (400), each in the route's API shape; admission counts engine requests."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.args import RequestLimits
from k2ray.serve.http.request_limits import json_depth
from k2ray.serve.http.router import build_router_app

from ..fakes import FakeEngine, make_context
from .test_router_app import _http

CKPT = str(tiny_checkpoint_dir())
USER = [{"role": "user", "content": "x"}]
CHAT = {"model": "k2-tiny", "messages": USER, "max_tokens": 4}
MESSAGES = {"model": "k2-tiny", "messages": USER, "max_tokens": 4}


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


def _app(tokenizer: K2Tokenizer, limits: RequestLimits | None = None, max_inflight: int = 8, **engine_kwargs):
    engine = FakeEngine(tokenizer.encode("Hi there<|im_end|>"), **engine_kwargs)
    ctx = make_context(CKPT, engine, max_inflight=max_inflight)
    if limits is not None:
        ctx = dataclasses.replace(ctx, limits=limits)
    return engine, build_router_app(ctx)


def _nested(levels: int) -> object:
    value: object = 1
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


async def _asgi_post(app, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict, int]:
    """POST through the raw ASGI interface; returns status, JSON body and how often the body was read."""
    num_reads = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal num_reads
        num_reads += 1
        if num_reads == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *headers], "server": ("router", 80),
             "client": ("test", 1)}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload), num_reads


@pytest.mark.parametrize(("path", "flavor"), [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")])
async def test_declared_body_over_the_limit_is_413_before_reading(tokenizer, path, flavor):
    _, app = _app(tokenizer)
    declared = str(RequestLimits().max_body_bytes + 1).encode()
    status, payload, num_reads = await _asgi_post(app, path, [(b"content-length", declared)], json.dumps(CHAT).encode())
    assert status == 413 and num_reads == 0
    if flavor == "anthropic":
        assert payload["type"] == "error" and payload["error"]["type"] == "request_too_large"
    else:
        assert payload["error"]["type"] == "invalid_request_error" and "too large" in payload["error"]["message"]


async def test_streamed_body_is_cut_off_at_the_limit(tokenizer):
    max_bytes = RequestLimits().max_body_bytes
    engine, app = _app(tokenizer)
    chunk = b" " * 65536  # whitespace: the body would be valid JSON, only too large

    async def body():  # no Content-Length: chunked, counted while it arrives
        yield b'{"model": "k2-tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]'
        for _ in range(max_bytes // len(chunk) + 1):
            yield chunk
        yield b"}"

    async with _http(app) as http:
        resp = await http.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
        assert resp.status_code == 413 and str(max_bytes) in resp.json()["error"]["message"]
        assert not engine.requests
        small = await http.post("/v1/chat/completions", json=CHAT)
        assert small.status_code == 200


async def test_json_nesting_beyond_the_limit_is_400(tokenizer):
    max_depth = RequestLimits().max_json_depth
    _, app = _app(tokenizer)
    async with _http(app) as http:
        deep = await http.post("/v1/chat/completions", json={**CHAT, "extra": _nested(max_depth)})
        assert deep.status_code == 400 and str(max_depth) in deep.json()["error"]["message"]
        deep = await http.post("/v1/messages", json={**MESSAGES, "metadata": {"k": _nested(max_depth)}})
        assert deep.status_code == 400 and deep.json()["type"] == "error"
        # At the bound, and brackets inside strings (escaped quotes too) do not count.
        ok = await http.post("/v1/chat/completions", json={**CHAT, "extra": _nested(max_depth - 1)})
        assert ok.status_code == 200
        text = '\\"[' * 60 + "{" * 60  # more brackets than the bound, fewer tokens than the context
        ok = await http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": text}]})
        assert ok.status_code == 200


@pytest.mark.parametrize("depth", [1, 2, 5, 64, 65])
def test_json_depth_matches_the_parsed_nesting(depth):
    value = _nested(depth)
    body = json.dumps({"a": value, "s": '[[{"\\\\', "t": "\\\\"}).encode()
    assert json_depth(body) == depth + 1
    assert json_depth(b'"[[["') == 0 and json_depth(b"[]") == 1


async def test_prompt_list_beyond_the_limit_is_400_before_tokenizing(tokenizer):
    max_prompts = RequestLimits().max_prompts
    engine, app = _app(tokenizer, max_inflight=256)
    async with _http(app) as http:
        resp = await http.post("/v1/completions", json={"model": "k2-tiny", "max_tokens": 1,
                                                         "prompt": ["x"] * (max_prompts + 1)})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
        assert str(max_prompts) in resp.json()["error"]["message"]
        assert not engine.requests
        resp = await http.post("/v1/completions", json={"model": "k2-tiny", "max_tokens": 1, "prompt": ["x"] * 4})
        assert resp.status_code == 200 and len(resp.json()["choices"]) == 4


async def test_engine_requests_per_request_are_bounded(tokenizer):
    limits = RequestLimits()
    engine, app = _app(tokenizer, max_inflight=256)
    num_prompts = limits.max_engine_requests // limits.max_n + 1  # each prompt allowed, their product not
    body = {"model": "k2-tiny", "max_tokens": 1, "prompt": [[5]] * num_prompts, "n": limits.max_n}
    async with _http(app) as http:
        resp = await http.post("/v1/completions", json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
        assert str(limits.max_engine_requests) in resp.json()["error"]["message"]
        assert not engine.requests


async def test_n_bound_is_configurable(tokenizer):
    _, app = _app(tokenizer, RequestLimits(max_n=2))
    async with _http(app) as http:
        resp = await http.post("/v1/chat/completions", json={**CHAT, "n": 3})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
        assert (await http.post("/v1/chat/completions", json={**CHAT, "n": 2})).status_code == 200


async def test_admission_counts_engine_requests(tokenizer):
    engine, app = _app(tokenizer, max_inflight=4, token_delay_s=0.05)
    async with _http(app) as http:
        wide = asyncio.create_task(http.post("/v1/chat/completions", json={**CHAT, "n": 3}))
        while len(engine.started) < 3:
            await asyncio.sleep(0.005)
        refused = await http.post("/v1/chat/completions", json={**CHAT, "n": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert (await wide).status_code == 200
        assert (await http.post("/v1/chat/completions", json={**CHAT, "n": 4})).status_code == 200
