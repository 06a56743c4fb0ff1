"""Router metrics: per-choice latencies on a fake clock, and the router app (FakeEngine, no Ray) counting each
request once with its status, finish reason and tokens."""

from __future__ import annotations

import httpx
import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.http.router import build_router_app
from k2ray.serve.metrics import RouterMetrics

from ..fakes import FakeEngine, make_context
from .recording import RecordingFactory

CKPT = str(tiny_checkpoint_dir())
CHAT = "/v1/chat/completions"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ttft_itl_tpot_and_e2e_of_one_choice():
    factory, clock = RecordingFactory(), FakeClock()
    metrics = RouterMetrics(factory, clock)
    request = metrics.start(CHAT)
    request.model = "k2-tiny"
    timer = request.choice_timer()
    clock.now += 0.5
    timer.on_tokens(1)  # first token after 0.5 s
    clock.now += 0.2
    timer.on_tokens(2)  # two tokens after 0.2 s: two gaps of 0.1 s
    clock.now += 0.1
    timer.on_tokens(0)  # a finish-only delta has no token to time
    timer.on_tokens(1)
    timer.on_finish("length")
    clock.now += 0.05
    request.finish(200)
    request.finish(500)  # a second exit path records nothing
    model = {"model": "k2-tiny"}
    assert factory.observations("k2ray_ttft_seconds", **model) == [0.5]
    assert factory.observations("k2ray_itl_seconds", **model) == pytest.approx([0.1, 0.1, 0.1])
    assert factory.observations("k2ray_tpot_seconds", **model) == pytest.approx([0.3 / 3])
    assert factory.observations("k2ray_e2e_seconds", route=CHAT, **model) == pytest.approx([0.85])
    assert factory.metrics["k2ray_requests"].values == {
        (("finish_reason", "length"), ("model", "k2-tiny"), ("route", CHAT), ("status", "200")): 1}


def test_the_most_telling_finish_reason_labels_a_request_with_several_choices():
    factory = RecordingFactory()
    request = RouterMetrics(factory).start(CHAT)
    for reason in ("stop", "length", "tool_calls"):
        request.choice_timer().on_finish(reason)
    request.finish(200)
    (labels,) = factory.metrics["k2ray_requests"].values
    assert dict(labels)["finish_reason"] == "length"


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


def _router(tokenizer: K2Tokenizer) -> tuple[RecordingFactory, httpx.AsyncClient]:
    factory = RecordingFactory()
    engine = FakeEngine(tokenizer.encode("<think>ponder</think>Hi there<|im_end|>"), num_cached_tokens=2)
    ctx = make_context(CKPT, engine)
    ctx.metrics = RouterMetrics(factory)
    app = build_router_app(ctx)
    return factory, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


def _requests(factory: RecordingFactory) -> dict[tuple[str, str, str, str], float]:
    """(route, model, status, finish_reason) -> count."""
    return {(d["route"], d["model"], d["status"], d["finish_reason"]): n
            for labels, n in factory.metrics["k2ray_requests"].values.items() if (d := dict(labels))}


async def test_router_counts_each_request_once_with_its_tokens(tokenizer):
    factory, client = _router(tokenizer)
    body = {"model": "k2-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    usage = (await client.post(CHAT, json=body)).json()["usage"]
    async with client.stream("POST", CHAT, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        frames = [line async for line in resp.aiter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    assert (await client.post(CHAT, json={**body, "model": "nope"})).status_code == 404
    assert (await client.post(CHAT, content=b"{")).status_code == 400
    assert _requests(factory) == {(CHAT, "k2-tiny", "200", "stop"): 2, (CHAT, "none", "404", "error"): 1,
                                  (CHAT, "none", "400", "error"): 1}
    model = {"model": "k2-tiny"}
    assert factory.value("k2ray_prompt_tokens", **model) == 2 * usage["prompt_tokens"]
    assert factory.value("k2ray_cached_tokens", **model) == 2 * usage["prompt_tokens_details"]["cached_tokens"] == 4
    assert factory.value("k2ray_output_tokens", **model) == 2 * usage["completion_tokens"]
    assert len(factory.observations("k2ray_ttft_seconds", **model)) == 2
    assert len(factory.observations("k2ray_e2e_seconds", route=CHAT, **model)) == 2
    assert len(factory.observations("k2ray_e2e_seconds", route=CHAT, model="none")) == 2


async def test_a_failed_stream_is_counted_as_an_error(tokenizer):
    factory, client = _router(tokenizer)
    body = {"model": "k2-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True,
            "k2ray_test": {"fail_after_tokens": 2}}
    async with client.stream("POST", CHAT, json=body) as resp:
        [line async for line in resp.aiter_lines()]
    assert _requests(factory) == {(CHAT, "k2-tiny", "200", "error"): 1}
