"""Several router and engine replicas: a second application on the session's Serve instance."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from k2ray.model.default_checkpoint import tiny_checkpoint_dir

from .conftest import E2E_ENGINE

MULTI_APP = "k2ray-multi"
MULTI_PREFIX = "/multi"


@pytest.fixture(scope="module", params=["channel", "grpc"])
def multi_app(live_app, request):
    from ray import serve

    from k2ray.serve.app import build_app
    from k2ray.serve.args import load_serve_args

    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "app_name": MULTI_APP, "route_prefix": MULTI_PREFIX,
        "served_model_name": "k2-tiny",
        "engine": {**E2E_ENGINE, "num_replicas": 2, "num_cpus": 0.5},
        # Both ways back from the engines: delta channel (2 x 2 links) and one Serve stream per request.
        "router": {"num_replicas": 2, "num_cpus": 0.25, "engine_transport": request.param,
                   "channel_host": "127.0.0.1"},
    })
    serve.run(build_app(args), name=MULTI_APP, route_prefix=MULTI_PREFIX)
    base = live_app.base_url.rstrip("/") + MULTI_PREFIX
    assert httpx.get(f"{base}/health").status_code == 200
    yield base
    serve.delete(MULTI_APP)


async def test_requests_spread_over_replicas(multi_app):
    client = openai.AsyncOpenAI(base_url=f"{multi_app}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> int:
        resp = await client.chat.completions.create(
            model="k2-tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4, n=2,
            extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True})
        return resp.usage.completion_tokens

    assert await asyncio.gather(*(one(i) for i in range(8))) == [8] * 8
    stream = await client.chat.completions.create(model="k2-tiny", messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=4, stream=True)
    assert [c async for c in stream][-1].choices[0].finish_reason in ("stop", "length")
