"""Responses API requests -> the chat completions request they mean."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from k2ray.api.openai_protocol import NamedToolChoice
from k2ray.api.responses_protocol import ResponsesRequest, input_messages, to_chat_request

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def _request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def test_string_input_and_instructions() -> None:
    assert input_messages(_request(instructions="Be brief.")) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_items_become_chat_turns() -> None:
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Oslo "},
                                                          {"type": "input_text", "text": "and Rome?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "both"}]},
        {"type": "function_call", "call_id": "functions.get_weather:0", "name": "get_weather",
         "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "functions.get_weather:1", "name": "get_weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "cloudy"},
        {"type": "function_call_output", "call_id": "functions.get_weather:1",
         "output": [{"type": "input_text", "text": "sunny"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Cloudy and sunny.", "annotations": []}]},
    ]
    messages = input_messages(_request(input=items))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert messages[1]["content"] == "Oslo and Rome?"
    # Both calls belong to one assistant turn, which carries the reasoning before them.
    turn = messages[2]
    assert turn["reasoning_content"] == "both" and turn["content"] == ""
    assert [c["id"] for c in turn["tool_calls"]] == ["functions.get_weather:0", "functions.get_weather:1"]
    assert turn["tool_calls"][1]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert messages[3] == {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "cloudy"}
    assert messages[4]["content"] == "sunny" and messages[5]["content"] == "Cloudy and sunny."


def test_non_text_parts_are_refused_by_position() -> None:
    req = _request(input=[{"role": "user", "content": [{"type": "input_text", "text": "see"},
                                                        {"type": "input_image", "image_url": "http://x/y.png"}]}])
    with pytest.raises(ValueError, match=r"input\[0\]\.content\[1\]: .*'input_image' are not supported"):
        input_messages(req)


def test_tools_choice_format_and_budget_map_to_chat() -> None:
    chat = to_chat_request(_request(
        tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        max_output_tokens=32, temperature=0.5, reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}))
    assert chat.tools[0].function.name == "get_weather" and chat.tools[0].function.parameters == {"type": "object"}
    assert isinstance(chat.tool_choice, NamedToolChoice) and chat.tool_choice.function.name == "get_weather"
    assert not chat.parallel_tool_calls and chat.requested_max_tokens == 32 and chat.temperature == 0.5
    assert chat.response_format.type == "json_schema" and chat.response_format.json_schema.json_schema == SCHEMA
    assert not chat.is_thinking
    assert to_chat_request(_request(tool_choice="required", tools=[TOOL])).tool_choice == "required"
    assert to_chat_request(_request(text={"format": {"type": "json_object"}})).response_format.type == "json_object"
    assert to_chat_request(_request(reasoning={"effort": "high"})).is_thinking
    assert to_chat_request(_request()).is_thinking  # K2 Thinking thinks unless told not to


@pytest.mark.parametrize(("fields", "message"), [
    ({"tool_choice": "required"}, "tool_choice requires tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}}, "unknown function 'other'"),
    ({"tools": [{"type": "web_search"}]}, "'function'"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "needs a name and a schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, "not a valid JSON Schema"),
    ({"input": []}, "input must not be empty"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
])
def test_invalid_requests(fields, message) -> None:
    with pytest.raises(ValidationError, match=message):
        _request(**fields)
