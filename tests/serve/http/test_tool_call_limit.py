"""At most one tool call (`parallel_tool_calls: false`, `disable_parallel_tool_use`): the decoder cuts the
output after the first complete call, and the router aborts the rest of the engine request."""

from __future__ import annotations

import json

import pytest

from k2ray.api.output_parser import K2OutputParser
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.engine.engine_protocol import EngineDelta
from k2ray.serve.http.generation import ChoiceDecoder

from .test_router_app import _anthropic, _app, _http, _openai

TWO_CALLS = ("<think>both</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
             '<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|><|tool_call_begin|>'
             'functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
             "<|tool_calls_section_end|><|im_end|>")
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "input_schema": {"type": "object"}}]
USER = [{"role": "user", "content": "Weather in Oslo and Rome?"}]


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(tiny_checkpoint_dir())


def _decode(tokenizer: K2Tokenizer, cut: int, limit: int | None, stop: list[str]) -> tuple[list, ChoiceDecoder]:
    ids = tokenizer.encode(TWO_CALLS)
    decoder = ChoiceDecoder(0, tokenizer, K2OutputParser(), stop, False, False)
    decoder.limit_tool_calls(limit)
    events = []
    for delta in (EngineDelta(ids[:cut]), EngineDelta(ids[cut:], finish_reason="stop")):
        events.append(decoder.feed(delta))
        if decoder.finished:
            break
    return events, decoder


@pytest.mark.parametrize("stop", [[], ["NEVER_SEEN_STOP"]])
def test_limit_cuts_after_the_first_complete_call_at_every_delta_cut(tokenizer, stop):
    num_ids = len(tokenizer.encode(TWO_CALLS))
    for cut in range(num_ids + 1):
        events, decoder = _decode(tokenizer, cut, 1, stop)
        assert [(c.name, c.arguments) for c in decoder.tool_calls] == [("get_weather", '{"city": "Oslo"}')], cut
        assert all(d.index == 0 for e in events for d in e.tool_calls), cut
        assert "".join(d.arguments for e in events for d in e.tool_calls) == '{"city": "Oslo"}'
        assert events[-1].finish_reason == "tool_calls" and decoder.finished
        assert not "".join(e.content for e in events), cut


def test_no_limit_keeps_every_call(tokenizer):
    events, decoder = _decode(tokenizer, 5, None, [])
    assert [c.id for c in decoder.tool_calls] == ["functions.get_weather:0", "functions.get_weather:1"]
    assert events[-1].finish_reason == "tool_calls"


async def test_openai_parallel_tool_calls_false_cuts_and_aborts(tokenizer):
    for stream in (False, True):
        engine, app = _app(tokenizer, TWO_CALLS)
        kwargs = {"model": "k2-tiny", "messages": USER, "tools": OPENAI_TOOLS, "parallel_tool_calls": False,
                  "max_tokens": 200}
        client = _openai(app)
        if stream:
            chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
            deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
            names = [d.function.name for d in deltas if d.function.name]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            choice = (await client.chat.completions.create(**kwargs)).choices[0]
            names = [c.function.name for c in choice.message.tool_calls]
            finish = [choice.finish_reason]
        assert names == ["get_weather"] and finish == ["tool_calls"]
        assert engine.aborted == engine.started  # the second call was never waited for


async def test_openai_parallel_tool_calls_default_keeps_both(tokenizer):
    engine, app = _app(tokenizer, TWO_CALLS)
    resp = await _openai(app).chat.completions.create(model="k2-tiny", messages=USER, tools=OPENAI_TOOLS,
                                                      max_tokens=200)
    assert len(resp.choices[0].message.tool_calls) == 2 and not engine.aborted


async def test_anthropic_disable_parallel_tool_use_non_stream_and_stream(tokenizer):
    kwargs = {"model": "k2-tiny", "max_tokens": 200, "messages": USER, "tools": ANTHROPIC_TOOLS,
              "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    engine, app = _app(tokenizer, TWO_CALLS)
    msg = await _anthropic(app).messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "tool_use"] and msg.stop_reason == "tool_use"
    assert msg.content[1].input == {"city": "Oslo"} and engine.aborted == engine.started
    engine, app = _app(tokenizer, TWO_CALLS)
    async with _anthropic(app).messages.stream(**kwargs) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use"] and final.stop_reason == "tool_use"
    assert kinds.count("content_block_start") == 2 and kinds[-1] == "message_stop"
    assert engine.aborted == engine.started


async def test_anthropic_default_keeps_both_calls(tokenizer):
    engine, app = _app(tokenizer, TWO_CALLS)
    msg = await _anthropic(app).messages.create(model="k2-tiny", max_tokens=200, messages=USER,
                                                tools=ANTHROPIC_TOOLS)
    assert [b.input for b in msg.content if b.type == "tool_use"] == [{"city": "Oslo"}, {"city": "Rome"}]


async def test_anthropic_forced_tool_with_limit(tokenizer):
    # The engine's grammar makes the model open the forced call itself (no prefill).
    script = ('<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
              '<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1'
              '<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    engine, app = _app(tokenizer, script)
    async with _http(app) as http:
        resp = await http.post("/v1/messages", json={
            "model": "k2-tiny", "max_tokens": 200, "messages": USER, "tools": ANTHROPIC_TOOLS,
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}})
    body = resp.json()
    assert [(b["type"], b["input"]) for b in body["content"]] == [("tool_use", {"city": "Oslo"})]
    assert body["stop_reason"] == "tool_use" and engine.aborted == engine.started
    assert json.dumps(body).count("tool_use") == 2  # the block and the stop reason, nothing else
