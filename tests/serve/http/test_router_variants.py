"""Standard and Turbo variants at the router: /v1/models lists them, each id reaches the engine with its
scheduling priority, and an unknown model is a 404 in each API's shape."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.args import DEFAULT_MODELS, STANDARD_PRIORITY, TURBO_PRIORITY
from k2ray.serve.http.auth import ANONYMOUS
from k2ray.serve.http.router import build_router_app

from ..fakes import FAKE_MAX_MODEL_LEN, FakeEngine, make_context

CKPT = str(tiny_checkpoint_dir())
STANDARD_ID, TURBO_ID = (m.id for m in DEFAULT_MODELS)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


def _app(tokenizer: K2Tokenizer, **engine_kwargs):
    engine = FakeEngine(tokenizer.encode("Hi there<|im_end|>"), **engine_kwargs)
    return engine, build_router_app(make_context(CKPT, engine, models=DEFAULT_MODELS))


def _http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


async def test_models_lists_every_variant(tokenizer):
    _, app = _app(tokenizer)
    async with _http(app) as http:
        body = (await http.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [(c["id"], c["object"], c["max_model_len"]) for c in body["data"]] == [
        (STANDARD_ID, "model", FAKE_MAX_MODEL_LEN), (TURBO_ID, "model", FAKE_MAX_MODEL_LEN)]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "n": 2}),
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 4}),
])
async def test_each_id_reaches_the_engine_with_its_priority(tokenizer, path, body):
    engine, app = _app(tokenizer)
    async with _http(app) as http:
        for model in (TURBO_ID, STANDARD_ID):
            resp = await http.post(path, json={**body, "model": model})
            assert resp.status_code == 200 and resp.json()["model"] == model
    priorities = [r.sampling_params.priority for r in engine.requests]
    n = len(priorities) // 2
    assert priorities == [TURBO_PRIORITY] * n + [STANDARD_PRIORITY] * n


async def test_concurrent_requests_keep_their_own_variant(tokenizer):
    # Each request checks its model on its own context: interleaved requests never swap priorities.
    engine, app = _app(tokenizer, token_delay_s=0.001)
    models = [TURBO_ID, STANDARD_ID] * 4  # within make_context's admission bound (8)
    async with _http(app) as http:
        responses = await asyncio.gather(*(
            http.post("/v1/chat/completions", json={
                "model": m, "messages": [{"role": "user", "content": f"request {i} end"}], "max_tokens": 3})
            for i, m in enumerate(models)))
    assert [r.json()["model"] for r in responses] == models
    assert len(engine.requests) == len(models)
    for request in engine.requests:
        prompt = tokenizer.decode(request.prompt_token_ids)
        index = int(prompt.split("request ", 1)[1].split(" end", 1)[0])
        expected = TURBO_PRIORITY if models[index] == TURBO_ID else STANDARD_PRIORITY
        assert request.sampling_params.priority == expected


async def test_unknown_model_is_404_in_each_api_shape(tokenizer):
    engine, app = _app(tokenizer)
    async with _http(app) as http:
        chat = await http.post("/v1/chat/completions", json={"model": "kimi-k2", "messages": MESSAGES})
        anthropic = await http.post("/v1/messages", json={"model": "kimi-k2", "messages": MESSAGES,
                                                          "max_tokens": 4})
    assert chat.status_code == 404 and "kimi-k2" in chat.json()["error"]["message"]
    assert anthropic.status_code == 404 and anthropic.json()["type"] == "error"
    assert "kimi-k2" in anthropic.json()["error"]["message"]
    assert engine.requests == []


def test_check_model_exposes_the_variant_on_the_per_request_context(tokenizer):
    ctx = make_context(CKPT, FakeEngine([]), models=DEFAULT_MODELS)
    scoped = ctx.for_caller(ANONYMOUS)
    turbo = scoped.check_model(TURBO_ID)
    assert (turbo.id, turbo.plan, turbo.priority) == (TURBO_ID, "moonshot-turbo", TURBO_PRIORITY)
    assert scoped.served_model is turbo and scoped.model_name == TURBO_ID
    assert ctx.served_model is None and ctx.model_name == STANDARD_ID  # the shared context is untouched
