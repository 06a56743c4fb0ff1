"""End-to-end: the `openai` SDK's `client.responses` against the live app (real engine, random k2-tiny model
under the grammar): text, streaming, a forced function tool whose arguments parse, json_schema output."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

CITY = {"type": "string", "enum": ["Oslo", "Rome"]}
# Enums keep the random model's arguments short, so every call closes well inside the budget.
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": True,
          "parameters": {"type": "object", "properties": {"city": CITY}, "required": ["city"],
                         "additionalProperties": False}}]
FORCED = {"type": "function", "name": "get_weather"}
NO_THINK = {"effort": "none"}
TIMEOUT_S = 120.0


class Answer(BaseModel):
    city: Literal["Oslo", "Rome"]


@pytest.fixture
def client(live_app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{live_app.base_url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


async def test_text_non_stream_and_stream(client, live_app):
    resp = await client.responses.create(model=live_app.model, input="Hello", instructions="Be brief.",
                                         max_output_tokens=16)
    assert resp.status in ("completed", "incomplete") and resp.output[0].type == "reasoning"
    assert resp.usage.input_tokens > 0 and 1 <= resp.usage.output_tokens <= 16
    assert resp.usage.output_tokens_details.reasoning_tokens <= resp.usage.output_tokens
    stream = await client.responses.create(model=live_app.model, input="Hello", max_output_tokens=16,
                                           reasoning=NO_THINK, stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and all(item.type == "message" for item in final.output)
    assert final.usage.output_tokens_details.reasoning_tokens == 0


async def test_forced_function_tool_arguments_parse(client, live_app):
    kwargs = {"model": live_app.model, "input": "Weather in Oslo?", "tools": TOOLS, "tool_choice": FORCED,
              "max_output_tokens": 256}
    resp = await client.responses.create(**kwargs)
    async with client.responses.stream(**kwargs) as stream:
        streamed = await stream.get_final_response()
    for final in (resp, streamed):
        calls = [item for item in final.output if item.type == "function_call"]
        assert final.status == "completed" and len(calls) == 1, final.output
        assert calls[0].name == "get_weather" and calls[0].call_id == "functions.get_weather:0"
        assert json.loads(calls[0].arguments)["city"] in ("Oslo", "Rome")
    # The call goes back with its output; the next turn renders it and answers.
    follow = await client.responses.create(
        model=live_app.model, tools=TOOLS, max_output_tokens=8, reasoning=NO_THINK,
        input=[{"role": "user", "content": "Weather in Oslo?"},
               *[item.model_dump(exclude_none=True) for item in resp.output],
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "cloudy"}])
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > resp.usage.input_tokens


async def test_json_schema_output_parses(client, live_app):
    # Thinking on: the schema applies from </think>, and the reasoning budget leaves it room.
    parsed = await client.responses.parse(model=live_app.model, input="Which city?", text_format=Answer,
                                          max_output_tokens=128)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Answer)
    stream = await client.responses.create(
        model=live_app.model, input="Which city?", max_output_tokens=64, reasoning=NO_THINK, stream=True,
        text={"format": {"type": "json_schema", "name": "answer", "strict": True,
                         "schema": Answer.model_json_schema() | {"additionalProperties": False}}})
    final = [event async for event in stream][-1].response
    assert final.status == "completed" and Answer.model_validate_json(final.output_text)


async def test_stateful_fields_are_a_400(client, live_app):
    with pytest.raises(openai.BadRequestError, match="store=true is not supported"):
        await client.responses.create(model=live_app.model, input="hi", store=True, max_output_tokens=4)
    with pytest.raises(openai.BadRequestError, match="previous_response_id is not supported"):
        await client.responses.create(model=live_app.model, input="hi", previous_response_id="resp_x",
                                      max_output_tokens=4)
