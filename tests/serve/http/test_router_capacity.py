"""A request beyond what the engine can hold is the router's clear 400, and never reaches the engine.

The router's max_model_len is what the engine reported at start (CoreReady: min(model limit, KV cache capacity
in tokens)); here a context built with a KV capacity below the model's window stands in for that report."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.http.router import build_router_app

from ..fakes import FakeEngine, make_context

CKPT = str(tiny_checkpoint_dir())
KV_CAPACITY_TOKENS = 96  # e.g. 6 blocks of 16 tokens, far below a 262,144-token window
PROMPT = [5] * 40


@pytest.fixture
def app_and_engine():
    engine = FakeEngine([7, 8, 9])
    ctx = dataclasses.replace(make_context(CKPT, engine), max_model_len=KV_CAPACITY_TOKENS)
    return build_router_app(ctx), engine


async def _complete(app, **body) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http:
        return await http.post("/v1/completions", json={"model": "k2-tiny", **body})


@pytest.mark.parametrize("body", [
    {"prompt": PROMPT, "max_tokens": KV_CAPACITY_TOKENS - len(PROMPT) + 1},  # prompt + max_tokens one over
    {"prompt": [5] * KV_CAPACITY_TOKENS, "max_tokens": 1},  # the prompt alone fills it
    {"prompt": [5] * KV_CAPACITY_TOKENS},  # no max_tokens: nothing left to generate
], ids=["one_over", "prompt_fills_it", "prompt_fills_it_no_max_tokens"])
async def test_beyond_capacity_is_a_clear_400(app_and_engine, body) -> None:
    app, engine = app_and_engine
    resp = await _complete(app, **body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert f"maximum context length is {KV_CAPACITY_TOKENS} tokens" in error["message"]
    assert error["type"] == "invalid_request_error" and "Traceback" not in resp.text
    assert engine.started == []


async def test_exactly_at_capacity_is_served(app_and_engine) -> None:
    app, engine = app_and_engine
    resp = await _complete(app, prompt=PROMPT, max_tokens=KV_CAPACITY_TOKENS - len(PROMPT))
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == len(PROMPT)
    assert engine.requests[0].sampling_params.max_tokens == KV_CAPACITY_TOKENS - len(PROMPT)
