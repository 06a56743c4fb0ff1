"""response_format json_object / json_schema: the router's mapping, then the `openai` SDK against the live app."""

from __future__ import annotations

import json
from types import SimpleNamespace

import openai
import pytest

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.openai_protocol import ChatCompletionRequest
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.args import RequestLimits
from k2ray.serve.handlers.openai_chat import chat_job, structured_output
from k2ray.serve.http.prompting import render_chat_prompt

NO_THINK = {"thinking": {"type": "disabled"}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
          "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
NUM_CHOICES = 4


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def test_router_maps_response_format_to_structured_output() -> None:
    tokenizer = K2Tokenizer.from_pretrained(tiny_checkpoint_dir())
    template = ChatTemplate.from_checkpoint(tiny_checkpoint_dir())

    def mapped(**fields):
        req = _request(**fields)
        job = chat_job(req)
        prompt = render_chat_prompt(job, template, tokenizer)
        ctx = SimpleNamespace(limits=RequestLimits())
        return structured_output(ctx, req, job, prompt, 64)

    assert mapped() is None and mapped(response_format={"type": "text"}) is None
    thinking = mapped(response_format={"type": "json_object"})
    # With thinking on the grammar covers the reasoning: it may end only through </think>, then JSON.
    assert thinking.json_object and thinking.reasoning and thinking.max_reasoning_tokens == 32
    plain = mapped(response_format=JSON_SCHEMA_FORMAT, **NO_THINK)
    assert plain.json_schema == SCHEMA and not plain.reasoning and plain.enforce_after_token_id is None
    # A forced tool call takes precedence over the response format.
    forced = mapped(response_format={"type": "json_object"}, tools=TOOLS, tool_choice="required")
    assert forced.tool_calls.mode == "required" and not forced.json_object and forced.json_schema is None


def test_response_format_validation() -> None:
    with pytest.raises(ValueError, match="needs a json_schema"):
        _request(response_format={"type": "json_schema"})
    with pytest.raises(ValueError, match="partial mode"):
        ChatCompletionRequest.model_validate({
            "model": "m", "response_format": JSON_SCHEMA_FORMAT,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{", "partial": True}]})


@pytest.fixture
def client(live_app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{live_app.base_url}/v1", api_key="unused", max_retries=0)


async def test_json_object_content_parses(client, live_app) -> None:
    response = await client.chat.completions.create(
        model=live_app.model, messages=[{"role": "user", "content": "Reply in JSON"}], n=NUM_CHOICES,
        response_format={"type": "json_object"}, max_tokens=128, temperature=1.0, seed=0, extra_body=NO_THINK)
    stopped = [c for c in response.choices if c.finish_reason == "stop"]
    assert stopped, [c.finish_reason for c in response.choices]
    assert all(isinstance(json.loads(c.message.content), dict) for c in stopped)
    assert all(c.message.content.startswith("{") for c in response.choices)


async def test_json_schema_streamed_content_validates(client, live_app) -> None:
    stream = await client.chat.completions.create(
        model=live_app.model, messages=[{"role": "user", "content": "Give me a"}], stream=True,
        response_format=JSON_SCHEMA_FORMAT, max_tokens=64, temperature=1.0, seed=1, extra_body=NO_THINK)
    content, finish_reason = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish_reason = choice.finish_reason or finish_reason
    assert finish_reason == "stop"
    value = json.loads(content)
    assert list(value) == ["a"] and isinstance(value["a"], int)


async def test_invalid_schema_is_a_400(client, live_app) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError, match=r"(?i)response_format.*json schema"):
        await client.chat.completions.create(model=live_app.model, messages=[{"role": "user", "content": "x"}],
                                             response_format=bad, max_tokens=8, extra_body=NO_THINK)
