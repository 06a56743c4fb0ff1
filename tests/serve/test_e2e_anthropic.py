"""End-to-end: the official `anthropic` SDK against the live app (real engine; injected streams for tools),
plus the one-tool-call limit of both APIs."""

from __future__ import annotations

import asyncio
import uuid

import anthropic
import httpx
import openai
import pytest

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
ENUM_TOOLS = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"enum": ["Oslo"]}},
                                                      "required": ["city"], "additionalProperties": False}}]
TOOL_SCRIPT = ("<think>Need the weather.</think><|tool_calls_section_begin|><|tool_call_begin|>"
               'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
               "<|tool_calls_section_end|><|im_end|>")


@pytest.fixture
def claude(live_app) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=live_app.base_url, api_key="unused", max_retries=0)


async def test_messages_non_stream_and_stream(claude, live_app):
    kwargs = {"model": live_app.model, "max_tokens": 8, "system": "Be brief.", "thinking": {"type": "disabled"},
              "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]}
    msg = await claude.messages.create(**kwargs)
    assert msg.role == "assistant" and msg.stop_reason in ("end_turn", "max_tokens")
    assert all(block.type == "text" for block in msg.content)
    assert 1 <= msg.usage.output_tokens <= 8 and msg.usage.input_tokens > 0
    async with claude.messages.stream(**kwargs) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.index("message_delta") > max(i for i, k in enumerate(kinds) if k.startswith("content_block"))
    assert final.usage.output_tokens == msg.usage.output_tokens or final.usage.output_tokens >= 1


async def test_stop_sequence_and_cache_read_tokens(claude, live_app):
    """Path: router -> `submit` -> engine replica -> engine core, which replays the `k2ray_test` script as
    engine outputs -> delta channel (the default transport) -> stop sequences in the router; cache reads from
    real requests."""
    script = "<think>ok</think>alpha beta END gamma<|im_end|>"
    system = "Shared preamble for caching. " * 20
    kwargs = {"model": live_app.model, "max_tokens": 64, "system": system, "stop_sequences": ["END"],
              "messages": [{"role": "user", "content": "Say it"}], "extra_body": {"k2ray_test": {"script": script}}}
    first = await claude.messages.create(**kwargs)
    assert first.stop_reason == "stop_sequence" and first.stop_sequence == "END"
    assert [b.type for b in first.content] == ["thinking", "text"] and first.content[1].text == "alpha beta "
    # Scripted requests skip the engine, so cache reads come from real requests sharing the system prompt.
    real = {k: v for k, v in kwargs.items() if k != "extra_body"} | {"max_tokens": 2}
    await claude.messages.create(**real)
    second = await claude.messages.create(**real)
    assert second.usage.cache_read_input_tokens > 0
    total_prompt = second.usage.input_tokens + second.usage.cache_read_input_tokens
    assert total_prompt > second.usage.cache_read_input_tokens


async def test_tool_use_round_trip(claude, live_app):
    """Path: router -> `submit` -> engine replica -> engine core, which replays the `k2ray_test` script as
    engine outputs -> delta channel (the default transport) -> tool-use parsing and SSE of the
    Anthropic API."""
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    async with claude.messages.stream(model=live_app.model, max_tokens=256, tools=TOOLS, messages=messages,
                                      extra_body={"k2ray_test": {"script": TOOL_SCRIPT}}) as stream:
        async for _ in stream:
            pass
        first = await stream.get_final_message()
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    tool_use = first.content[1]
    assert (tool_use.id, tool_use.name, tool_use.input) == ("functions.get_weather:0", "get_weather", {"city": "Oslo"})
    assert first.content[0].thinking == "Need the weather." and first.stop_reason == "tool_use"
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                               "content": "cloudy"}]}]
    answer = await claude.messages.create(
        model=live_app.model, max_tokens=64, tools=TOOLS, messages=messages,
        extra_body={"k2ray_test": {"script": "<think>done</think>Cloudy in Oslo.<|im_end|>"}})
    assert answer.content[-1].text == "Cloudy in Oslo." and answer.stop_reason == "end_turn"
    # The real (random) model under the grammar: a declared, forced call whose input is a valid object,
    # and whose id continues the conversation's counter. An enum keeps the random model's arguments short.
    forced = await claude.messages.create(
        model=live_app.model, max_tokens=256, tools=ENUM_TOOLS, messages=messages,
        tool_choice={"type": "tool", "name": "get_weather"}, thinking={"type": "disabled"})
    assert forced.stop_reason == "tool_use" and [b.type for b in forced.content] == ["tool_use"]
    assert (forced.content[0].id, forced.content[0].input) == ("functions.get_weather:1", {"city": "Oslo"})


async def test_count_tokens_matches_messages_input(claude, live_app):
    # The tool declaration comes first in K2's prompt, so its blocks are usually prefix-cache hits: the
    # count is the whole prompt, which Anthropic's usage splits into input and cache reads.
    kwargs = {"model": live_app.model, "system": f"count {uuid.uuid4().hex}", "tools": TOOLS,
              "thinking": {"type": "disabled"}, "messages": [{"role": "user", "content": "Weather in Oslo?"}]}
    count = await claude.messages.count_tokens(**kwargs)
    msg = await claude.messages.create(max_tokens=1, **kwargs)
    assert count.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert msg.usage.input_tokens > 0  # the fresh system prompt is never cached
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.count_tokens(**(kwargs | {"model": "unknown"}))


async def test_raw_stream_pings_after_message_start(live_app):
    body = {"model": live_app.model, "max_tokens": 4, "stream": True, "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": "Hello"}]}
    async with httpx.AsyncClient(base_url=live_app.base_url) as http:
        resp = await http.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    names = [line.removeprefix("event: ") for line in resp.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    assert 'data: {"type":"ping"}' in resp.text


TWO_CALLS = ("<think>both</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
             '<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|><|tool_call_begin|>'
             'functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
             "<|tool_calls_section_end|><|im_end|>")


async def _assert_engine_idle(live_app) -> None:
    for _ in range(200):
        stats = await live_app.engine_stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]


async def test_disable_parallel_tool_use(claude, live_app):
    """Path: router -> `submit` -> engine replica -> engine core, which replays the `k2ray_test` script as
    engine outputs -> delta channel (the default transport) -> the one-tool-call limit, which aborts the
    rest in the engine core."""
    kwargs = {"model": live_app.model, "max_tokens": 256, "tools": TOOLS,
              "messages": [{"role": "user", "content": "Oslo and Rome?"}],
              "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
              "extra_body": {"k2ray_test": {"script": TWO_CALLS}}}
    msg = await claude.messages.create(**kwargs)
    async with claude.messages.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        streamed = await stream.get_final_message()
    for final in (msg, streamed):
        assert [b.type for b in final.content] == ["thinking", "tool_use"] and final.stop_reason == "tool_use"
        assert final.content[1].input == {"city": "Oslo"}
    await _assert_engine_idle(live_app)


async def test_openai_parallel_tool_calls_false(live_app):
    """Path: router -> `submit` -> engine replica -> engine core, which replays the `k2ray_test` script as
    engine outputs -> delta channel (the default transport) -> the one-tool-call limit, which aborts the
    rest in the engine core."""
    client = openai.AsyncOpenAI(base_url=f"{live_app.base_url}/v1", api_key="unused", max_retries=0)
    kwargs = {"model": live_app.model, "max_tokens": 256, "parallel_tool_calls": False,
              "messages": [{"role": "user", "content": "Oslo and Rome?"}],
              "tools": [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
                        for t in TOOLS],
              "extra_body": {"k2ray_test": {"script": TWO_CALLS}}}
    choice = (await client.chat.completions.create(**kwargs)).choices[0]
    assert [c.function.arguments for c in choice.message.tool_calls] == ['{"city": "Oslo"}']
    assert choice.finish_reason == "tool_calls"
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    names = [d.function.name for c in chunks for d in (c.choices[0].delta.tool_calls or []) if d.function.name]
    assert names == ["get_weather"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    await _assert_engine_idle(live_app)
