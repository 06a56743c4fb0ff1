"""API-neutral chat request -> K2 prompt token ids, parser settings and per-choice sampling params.

`tool_choice` required/named is enforced by prefilling the opening of K2's tool-call section in the
prompt (the model then has to continue inside a call); the prefilled text is fed to the output parser
too, so the forced call's id and name reach the client like any parsed call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.output_parser import (
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    SECTION_BEGINS,
    K2OutputParser,
)
from k2ray.api.prompt_segments import PromptSegment, joined_text, trusted, untrusted
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.sampling_params import SamplingParams
from k2ray.serve.http.errors import ApiError, invalid_request


@dataclass(frozen=True)
class ChatJob:
    """A chat request in the OpenAI message vocabulary, whichever API it came from."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: str  # "auto" | "none" | "required" | "named"
    forced_tool_name: str | None
    thinking: bool


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list[int]
    prefill_text: str  # text appended to the prompt on the model's behalf (forced tool call opening)
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
    prefill = forced_tool_call_prefill(job, offset) if not partial else []
    # A partial assistant message is rendered with its think block closed, so the model continues content.
    return ChatPrompt(
        token_ids=tokenizer.encode_segments(segments + prefill),
        prefill_text=joined_text(prefill),
        tool_call_id_offset=offset,
        parser_thinking=job.thinking and not partial,
        tools_enabled=tools is not None,
    )


def forced_tool_call_prefill(job: ChatJob, tool_call_id_offset: int) -> list[PromptSegment]:
    """The opening of K2's tool-call section that `tool_choice` required/named prefills for the model."""
    if job.tool_choice == "required":
        return [trusted(SECTION_BEGINS[0])]
    if job.tool_choice == "named":
        return [trusted(SECTION_BEGINS[0] + CALL_BEGIN),
                untrusted(f"functions.{job.forced_tool_name}:{tool_call_id_offset}"), trusted(ARGUMENT_BEGIN)]
    return []


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
