"""Conversations -> training sequences: the prompt exactly as the server renders and tokenizes it, and a
loss mask over the assistant turns the model generates (reasoning, content, tool calls, `<|im_end|>`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k2ray.api.chat_template import (
    IM_END,
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    ChatTemplate,
)
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.tools import WEB_SEARCH_DESCRIPTION, WEB_SEARCH_PARAMETERS

from .conversations import Conversation, client_messages
from .tools import WEB_SEARCH_NAME


@dataclass(frozen=True)
class Sequence:
    token_ids: list[int]
    loss_mask: list[bool]  # True where the token is one the model must predict (an assistant token)


def declared_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Client tools as the server declares them to the model (`$web_search` becomes its function)."""
    if not tools:
        return None
    out = []
    for tool in tools:
        if tool.get("type") == "builtin_function" and tool["function"]["name"] == WEB_SEARCH_NAME:
            tool = {"type": "function", "function": {"name": WEB_SEARCH_NAME, "description": WEB_SEARCH_DESCRIPTION,
                                                    "parameters": WEB_SEARCH_PARAMETERS}}
        out.append(tool)
    return out


def generated_text(message: dict[str, Any]) -> str:
    """What the model generates for an assistant message after the generation prompt."""
    reasoning = message.get("_reasoning") or message.get("reasoning_content") or ""
    text = THINK_BEGIN + reasoning + THINK_END + (message.get("content") or "")
    if message.get("tool_calls"):
        text += TOOL_CALLS_SECTION_BEGIN
        for call in message["tool_calls"]:
            text += (TOOL_CALL_BEGIN + call["id"] + TOOL_CALL_ARGUMENT_BEGIN + call["function"]["arguments"]
                     + TOOL_CALL_END)
        text += TOOL_CALLS_SECTION_END
    return text + IM_END


def render_prompt(template: ChatTemplate, conversation: Conversation, num_messages: int) -> str:
    messages = client_messages(conversation.messages[:num_messages])
    return template.render(messages, tools=declared_tools(conversation.tools), add_generation_prompt=True)


def text_spans(template: ChatTemplate, conversation: Conversation) -> list[tuple[str, bool]]:
    """The last assistant turn's prompt + generation as (text, is_target) pieces; earlier assistant messages
    of the same user turn are targets too where the prompt shows them exactly as they were generated."""
    messages = conversation.messages
    last = len(messages) - 1
    full = render_prompt(template, conversation, last) + generated_text(messages[last])
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    spans: list[tuple[int, int]] = []
    for k in range(last_user + 1, last + 1):
        if messages[k]["role"] != "assistant":
            continue
        prefix, target = render_prompt(template, conversation, k), generated_text(messages[k])
        if full.startswith(prefix + target):
            spans.append((len(prefix), len(prefix) + len(target)))
    pieces, pos = [], 0
    for start, end in spans:
        pieces += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    assert pos == len(full), "the last assistant turn must be a target"
    return pieces


def encode(tokenizer: K2Tokenizer, template: ChatTemplate, conversation: Conversation) -> Sequence:
    # Pieces split right after <|im_middle|> and <|im_end|> (special tokens), so encoding them one by one
    # gives the ids the server gets from the whole prompt.
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_target in text_spans(template, conversation):
        piece = tokenizer.encode(text, allow_special_tokens=True)
        ids += piece
        mask += [is_target] * len(piece)
    return Sequence(ids, mask)
