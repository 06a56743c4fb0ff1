"""End-to-end: the official `anthropic` SDK against the live app (real engine; injected streams for tools)."""

from __future__ import annotations

import anthropic
import pytest

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
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
    forced = await claude.messages.create(
        model=live_app.model, max_tokens=16, tools=TOOLS, messages=messages,
        tool_choice={"type": "tool", "name": "get_weather"})
    # The forced call's opening is prefilled, so its id continues the conversation's counter.
    assert forced.content[0].type == "tool_use" and forced.content[0].id == "functions.get_weather:1"
