"""A huge prompt is rendered and tokenized off the router's event loop: other streams keep flowing."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir

from .test_router_app import _app, _http

HUGE_PROMPT_CHARS = 1_500_000  # ~1 s to tokenize here: far above the router's offload size
NUM_STREAM_TOKENS = 400
TOKEN_DELAY_S = 0.005


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(tiny_checkpoint_dir())


def _huge_text() -> str:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(4096)]
    return " ".join(rng.choice(words) for _ in range(HUGE_PROMPT_CHARS // 5))[:HUGE_PROMPT_CHARS]


async def _stream_write_times(app, body: dict, stamps: list[float]) -> None:
    """Runs one streaming request through the ASGI app, noting when each body write leaves."""
    requests = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            stamps.append(time.perf_counter())

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "server": ("router", 80),
             "client": ("test", 1)}
    await app(scope, receive, send)


async def test_huge_prompt_does_not_stall_other_streams(tokenizer):
    engine, app = _app(tokenizer, "tick " * NUM_STREAM_TOKENS + "<|im_end|>", token_delay_s=TOKEN_DELAY_S)
    huge = {"model": "k2-tiny", "max_tokens": 4, "messages": [{"role": "user", "content": _huge_text()}]}
    started = time.perf_counter()
    num_huge_tokens = len(tokenizer.encode(huge["messages"][0]["content"]))
    encode_s = time.perf_counter() - started  # what the huge request costs, measured here and now

    stamps: list[float] = []
    stream = asyncio.create_task(_stream_write_times(app, {
        "model": "k2-tiny", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "thinking": {"type": "disabled"}}, stamps))
    while len(stamps) < 10:
        await asyncio.sleep(TOKEN_DELAY_S)
    async with _http(app) as http:
        begin = time.perf_counter()
        resp = await http.post("/v1/chat/completions", json=huge)
        end = time.perf_counter()
    await stream
    # Beyond the fake's context, found once the whole prompt was tokenized while the stream ran.
    assert resp.status_code == 400
    assert int(re.search(r"(\d+) in the messages", resp.json()["error"]["message"]).group(1)) >= num_huge_tokens
    during = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b > begin and a < end]
    assert stamps[-1] > end and during, "the stream must outlive the huge request"
    # Inline, one gap would span the whole tokenization; off the loop, gaps stay at the stream's pace.
    assert max(during) < encode_s / 2, (max(during), encode_s)
