"""Anthropic request models: the prompt part shared with count_tokens, and disable_parallel_tool_use."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from k2ray.api.anthropic_protocol import MessagesPrompt, MessagesRequest, MessageTokensCount

TOOLS = [{"name": "get_weather", "input_schema": {"type": "object"}}]
PROMPT = {"model": "k2-tiny", "messages": [{"role": "user", "content": "hi"}],
          "system": [{"type": "text", "text": "Be"}, {"type": "text", "text": " brief"}]}


def test_count_tokens_body_ignores_generation_fields():
    prompt = MessagesPrompt.model_validate({**PROMPT, "max_tokens": 5, "stream": True, "temperature": 0.5,
                                            "cache_control": {"type": "ephemeral"}})
    assert prompt.system_text() == "Be brief" and prompt.is_thinking and prompt.max_tool_calls is None
    assert not hasattr(prompt, "max_tokens")


def test_messages_request_extends_the_prompt_and_needs_max_tokens():
    req = MessagesRequest.model_validate({**PROMPT, "max_tokens": 5, "thinking": {"type": "disabled"}})
    assert isinstance(req, MessagesPrompt) and req.max_tokens == 5 and not req.is_thinking
    with pytest.raises(ValidationError):
        MessagesRequest.model_validate(PROMPT)


@pytest.mark.parametrize("model", [MessagesPrompt, MessagesRequest])
@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "nope"}])
def test_tool_choice_is_checked_for_both_endpoints(model, tool_choice):
    body = {**PROMPT, "max_tokens": 5, "tool_choice": tool_choice}
    if tool_choice["type"] == "tool":
        body["tools"] = TOOLS
    with pytest.raises(ValidationError):
        model.model_validate(body)


@pytest.mark.parametrize(("tool_choice", "limit"), [
    ({"type": "auto"}, None),
    ({"type": "auto", "disable_parallel_tool_use": True}, 1),
    ({"type": "any", "disable_parallel_tool_use": True}, 1),
    ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, 1),
    ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": False}, None),
])
def test_disable_parallel_tool_use_limits_to_one_call(tool_choice, limit):
    req = MessagesRequest.model_validate({**PROMPT, "max_tokens": 5, "tools": TOOLS, "tool_choice": tool_choice})
    assert req.max_tool_calls == limit


def test_token_count_shape():
    assert MessageTokensCount(input_tokens=7).model_dump() == {"input_tokens": 7}
