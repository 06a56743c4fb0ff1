"""Anthropic routes over a FakeEngine: count_tokens equals the prompt /v1/messages sends; ping after
message_start."""

from __future__ import annotations

import json

import anthropic
import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir

from .test_router_app import _anthropic, _app, _http

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "look it up", "signature": ""},
                                      {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather",
                                       "input": {"city": "Oslo"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.get_weather:0",
                                  "content": "cloudy"}]},
]
PROMPTS = [
    {"messages": [{"role": "user", "content": "Hello"}]},
    {"messages": [{"role": "user", "content": "Hello"}], "system": "Be brief.", "thinking": {"type": "disabled"}},
    {"messages": HISTORY, "tools": TOOLS, "system": [{"type": "text", "text": "You forecast."}]},
    {"messages": HISTORY, "tools": TOOLS, "tool_choice": {"type": "any"}},
    {"messages": HISTORY, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "get_weather"}},
    {"messages": HISTORY, "tools": TOOLS, "tool_choice": {"type": "none"}},
]


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(tiny_checkpoint_dir())


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_count_tokens_equals_the_prompt_sent_to_the_engine(tokenizer, prompt):
    engine, app = _app(tokenizer)
    client = _anthropic(app)
    count = await client.messages.count_tokens(model="k2-tiny", **prompt)
    msg = await client.messages.create(model="k2-tiny", max_tokens=8, **prompt)
    assert count.input_tokens == len(engine.requests[-1].prompt_token_ids)
    assert count.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert len(engine.requests) == 1  # counting never reaches the engine


async def test_count_tokens_errors_in_anthropic_shape(tokenizer):
    _, app = _app(tokenizer)
    client = _anthropic(app)
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"
    async with _http(app) as http:
        bad = [await http.post("/v1/messages/count_tokens", json=body) for body in (
            {"model": "k2-tiny", "messages": []},
            {"model": "k2-tiny", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
             "tool_choice": {"type": "tool", "name": "other"}},
        )]
        broken = await http.post("/v1/messages/count_tokens", content=b"{not json")
    for resp in (*bad, broken):
        assert resp.status_code == 400
        assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "invalid_request_error"


def _sse_events(raw: str) -> list[tuple[str, dict]]:
    events = []
    for frame in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_stream_sends_ping_right_after_message_start(tokenizer):
    _, app = _app(tokenizer)
    async with _http(app) as http:
        resp = await http.post("/v1/messages", json={"model": "k2-tiny", "max_tokens": 32, "stream": True,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    events = _sse_events(resp.text)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names.count("ping") == 1
    assert events[1][1] == {"type": "ping"}
    assert all(name == data["type"] for name, data in events)
    assert names[-2:] == ["message_delta", "message_stop"]
    assert set(names[2:-2]) == {"content_block_start", "content_block_delta", "content_block_stop"}
