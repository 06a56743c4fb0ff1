"""API-neutral chat request -> K2 prompt token ids, parser settings and per-choice sampling params.

Tool calls and JSON output are enforced by the engine's grammar (k2ray/engine/structured/tool_call_grammar.py),
not by prefilling the prompt: a prefilled section opening fixed the name but left the arguments free,
and could not express "at least one call" after the reasoning. `chat_structured_output` turns the
request's tools, tool_choice, parallel setting and response format into that grammar's spec; with
thinking on, the constraint starts where the reasoning ends, and a reasoning budget (a share of
max_tokens, capped by `max_reasoning_tokens`) forces `</think>` so the constrained part gets room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.output_parser import K2OutputParser
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.sampling_params import (
    SamplingParams,
    StructuredOutputParams,
    ToolCallParams,
    ToolFunction,
)
from k2ray.serve.args import RequestLimits
from k2ray.serve.http.errors import ApiError, invalid_request


@dataclass(frozen=True)
class ChatJob:
    """A chat request in the OpenAI message vocabulary, whichever API it came from."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: str  # "auto" | "none" | "required" | "named"
    forced_tool_name: str | None
    thinking: bool
    parallel_tool_calls: bool = True
    constrain_tool_calls: bool = True  # False: the declared tools are not grammar-enforced


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list[int]
    tool_call_id_offset: int
    parser_thinking: bool
    tools_enabled: bool

    def new_parser(self) -> K2OutputParser:
        return K2OutputParser(thinking=self.parser_thinking, tools_enabled=self.tools_enabled,
                              tool_call_id_offset=self.tool_call_id_offset)


def count_history_tool_calls(messages: list[dict[str, Any]]) -> int:
    """Tool calls in earlier assistant turns: the conversation-global offset of new tool-call ids."""
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def render_chat_prompt(job: ChatJob, template: ChatTemplate, tokenizer: K2Tokenizer) -> ChatPrompt:
    partial = bool(job.messages) and job.messages[-1].get("role") == "assistant" \
        and bool(job.messages[-1].get("partial"))
    offset = count_history_tool_calls(job.messages[:-1] if partial else job.messages)
    tools = job.tools if job.tool_choice != "none" else None
    try:
        segments = template.render_segments(job.messages, tools=tools, add_generation_prompt=not partial,
                                            thinking=job.thinking)
    except Exception as exc:  # the sandboxed template raises on malformed conversations
        raise invalid_request(f"Cannot render the conversation: {exc}", param="messages") from None
    # A partial assistant message is rendered with its think block closed, so the model continues content.
    return ChatPrompt(
        token_ids=tokenizer.encode_segments(segments),
        tool_call_id_offset=offset,
        parser_thinking=job.thinking and not partial,
        tools_enabled=tools is not None,
    )


def chat_structured_output(job: ChatJob, prompt: ChatPrompt, json_object: bool, json_schema: dict[str, Any] | None,
                           max_tokens: int, limits: RequestLimits) -> StructuredOutputParams | None:
    """The grammar spec of a chat request: its declared tools under its tool_choice, and its response
    format (`json_object`, or `json_schema`; a forced call overrides it, as in vLLM); None when
    neither constrains the output."""
    tools = None
    if job.tools and job.constrain_tool_calls:
        try:
            functions = tuple(ToolFunction(t["function"]["name"], t["function"].get("parameters"))
                              for t in job.tools)
            tools = ToolCallParams(functions, job.tool_choice, job.forced_tool_name, job.parallel_tool_calls,
                                   prompt.tool_call_id_offset)
        except ValueError as exc:
            raise invalid_request(str(exc), param="tools") from None
    if job.tool_choice in ("required", "named"):
        json_object, json_schema = False, None
    if tools is None and not json_object and json_schema is None:
        return None
    budget = reasoning_budget(max_tokens, limits) if prompt.parser_thinking else None
    return StructuredOutputParams(json_object=json_object, json_schema=json_schema, tool_calls=tools,
                                  reasoning=prompt.parser_thinking, max_reasoning_tokens=budget)


def reasoning_budget(max_tokens: int, limits: RequestLimits) -> int:
    """Reasoning tokens before `</think>` is forced: a share of the output budget, capped."""
    budget = math.floor(max_tokens * limits.reasoning_token_share)
    return budget if limits.max_reasoning_tokens is None else min(budget, limits.max_reasoning_tokens)


def resolve_max_tokens(num_prompt_tokens: int, requested: int | None, max_model_len: int) -> int:
    """The generation budget; a prompt that leaves no room, or an explicit budget that does not fit, is a
    400 naming both numbers (Moonshot/vLLM wording)."""
    if requested is None:
        if num_prompt_tokens >= max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                                f"your messages resulted in {num_prompt_tokens} tokens.", param="messages")
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + requested > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
                            f"messages, {requested} in the completion). Please reduce the length of the "
                            f"messages or completion.", param="max_tokens")
    return requested


def fan_out(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices become n single-sequence engine requests; a seeded request uses seed + i for choice i
    so the choices differ but the whole response stays reproducible."""
    base = replace(params, n=1)
    if params.seed is None:
        return [base for _ in range(n)]
    return [replace(base, seed=params.seed + i) for i in range(n)]
