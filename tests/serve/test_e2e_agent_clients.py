"""End-to-end: the agent clients users plug in (LangChain, openai-agents, litellm, the anthropic SDK's stream
helper) against the live app, with the random k2-tiny model under the grammar: a forced tool gives a call
whose arguments parse, structured output parses. Network to the live app on 127.0.0.1 only."""

from __future__ import annotations

import json
from typing import Literal

import anthropic
import httpx
import openai
import pytest
from pydantic import BaseModel

CITIES = ("Oslo", "Rome")
# Enums keep the random model's arguments short, so every call closes well inside the budget.
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "enum": list(CITIES)}},
              "required": ["city"], "additionalProperties": False}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                "parameters": PARAMETERS}}]
MAX_TOKENS = 256
TIMEOUT_S = 120.0


class Answer(BaseModel):
    city: Literal["Oslo", "Rome"]


def get_weather(city: Literal["Oslo", "Rome"]) -> str:
    """Weather for a city."""
    return f"cloudy in {city}"


def _chat_model(live_app, http_client: httpx.AsyncClient, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=live_app.model, base_url=f"{live_app.base_url}/v1", api_key="unused", max_retries=0,
                      timeout=TIMEOUT_S, max_tokens=MAX_TOKENS, http_async_client=http_client, **kwargs)


@pytest.mark.parametrize("use_responses_api", [False, True])
async def test_langchain_bind_tools_named_gives_tool_calls(live_app, use_responses_api):
    from langchain_core.tools import tool

    # LangChain caches one default client per base URL, bound to the first test's event loop: each test has its own.
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        llm = _chat_model(live_app, http, use_responses_api=use_responses_api)
        message = await llm.bind_tools([tool(get_weather)], tool_choice="get_weather").ainvoke("Weather in Oslo?")
    assert message.invalid_tool_calls == [] and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["args"]["city"] in CITIES


async def test_langchain_structured_output_strict_parses(live_app):
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        llm = _chat_model(live_app, http)
        answer = await llm.with_structured_output(Answer, method="json_schema", strict=True).ainvoke("Which city?")
    assert isinstance(answer, Answer)


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
async def test_openai_agents_runs_the_forced_tool(live_app, api):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no trace export: nothing leaves 127.0.0.1
    client = openai.AsyncOpenAI(base_url=f"{live_app.base_url}/v1", api_key="unused", max_retries=0,
                                timeout=TIMEOUT_S)
    model_class = OpenAIChatCompletionsModel if api == "chat_completions" else OpenAIResponsesModel
    cities: list[str] = []

    @function_tool
    def weather(city: Literal["Oslo", "Rome"]) -> str:
        """Weather for a city."""
        cities.append(city)
        return get_weather(city)

    agent = Agent(name="weather", instructions="Answer with the tool.", tools=[weather],
                  model=model_class(model=live_app.model, openai_client=client),
                  model_settings=ModelSettings(tool_choice="weather", max_tokens=MAX_TOKENS),
                  tool_use_behavior="stop_on_first_tool")
    result = await Runner.run(agent, "Weather in Oslo?", max_turns=2)
    assert len(cities) == 1 and cities[0] in CITIES
    assert result.final_output == get_weather(cities[0])


@pytest.fixture
def litellm(monkeypatch):
    # litellm fetches its model price map from GitHub at import unless told to use the bundled copy.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return pytest.importorskip("litellm")


async def test_litellm_forced_tool_call_parses(live_app, litellm):
    response = await litellm.acompletion(
        model=f"openai/{live_app.model}", api_base=f"{live_app.base_url}/v1", api_key="unused",
        messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=CHAT_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=MAX_TOKENS,
        timeout=TIMEOUT_S, num_retries=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in CITIES


async def test_anthropic_stream_forced_tool_final_message(live_app):
    claude = anthropic.AsyncAnthropic(base_url=live_app.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    tools = [{"name": "get_weather", "description": "Weather for a city", "input_schema": PARAMETERS}]
    async with claude.messages.stream(model=live_app.model, max_tokens=MAX_TOKENS, tools=tools,
                                      tool_choice={"type": "tool", "name": "get_weather"},
                                      messages=[{"role": "user", "content": "Weather in Oslo?"}]) as stream:
        final = await stream.get_final_message()
    uses = [block for block in final.content if block.type == "tool_use"]
    assert final.stop_reason == "tool_use" and len(uses) == 1
    assert isinstance(uses[0].input, dict) and uses[0].input["city"] in CITIES
