"""ChoiceEvents -> OpenAI payloads: stream chunks, usage, logprobs (chat and legacy completions)."""

from __future__ import annotations

from typing import Any

from k2ray.api.openai_responses import (
    CompletionLogprobs,
    CompletionTokensDetails,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from k2ray.api.output_parser import ToolCallDelta
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.serve.http.generation import ChoiceDecoder, ChoiceEvent


def usage_payload(num_prompt_tokens: int, decoders: list[ChoiceDecoder], num_prompts: int = 1) -> Usage:
    """The prompt is counted once per prompt (not per choice); cached tokens are the engine's real
    prefix-cache hits for the first choice of each prompt."""
    per_prompt = max(len(decoders) // num_prompts, 1)
    cached = sum(d.num_cached_tokens for d in decoders[::per_prompt])
    completion = sum(d.num_completion_tokens for d in decoders)
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=completion,
        total_tokens=num_prompt_tokens + completion,
        cached_tokens=cached,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=sum(d.num_reasoning_tokens for d in decoders)),
    )


def token_text(tokenizer: K2Tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def format_logprobs(tokenizer: K2Tokenizer, tokens: list[tuple[int, dict[int, float]]],
                    top_n: int) -> list[TokenLogprob]:
    out = []
    for token_id, candidates in tokens:
        text, raw = token_text(tokenizer, token_id)
        ranked = sorted(candidates.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        top = [TopLogprob(token=t, logprob=lp, bytes=b)
               for (tid, lp) in ranked for (t, b) in [token_text(tokenizer, tid)]]
        out.append(TokenLogprob(token=text, logprob=candidates.get(token_id, 0.0), bytes=raw, top_logprobs=top))
    return out


def completion_logprobs(tokenizer: K2Tokenizer, tokens: list[tuple[int, dict[int, float]]], top_n: int,
                        text_offset: int) -> CompletionLogprobs:
    """The legacy /v1/completions shape: parallel lists, top alternatives as {token: logprob}."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, candidates in tokens:
        text, _ = token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(candidates.get(token_id, 0.0))
        ranked = sorted(candidates.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        # Tokens with the same text (partial UTF-8 bytes all render as U+FFFD) share a key: keep the likeliest.
        out.top_logprobs.append({token_text(tokenizer, tid)[0]: lp for tid, lp in reversed(ranked)})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def tool_call_delta_payload(delta: ToolCallDelta) -> dict[str, Any]:
    if delta.id is not None:
        return {"index": delta.index, "id": delta.id, "type": "function",
                "function": {"name": delta.name, "arguments": delta.arguments}}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}


def role_payload(head: dict[str, Any], index: int, usage_null: bool) -> dict[str, Any]:
    payload = {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
    if usage_null:
        payload["usage"] = None
    return payload


def chunk_payload(tokenizer: K2Tokenizer, head: dict[str, Any], event: ChoiceEvent, top_n: int,
                  usage_null: bool) -> dict[str, Any] | None:
    """One chat.completion.chunk for one event, or None when the event carries nothing to send."""
    delta: dict[str, Any] = {}
    if event.reasoning:
        delta["reasoning_content"] = event.reasoning
    if event.content:
        delta["content"] = event.content
    if event.tool_calls:
        delta["tool_calls"] = [tool_call_delta_payload(d) for d in event.tool_calls]
    if not delta and event.finish_reason is None and not event.logprobs:
        return None
    choice: dict[str, Any] = {"index": event.index, "delta": delta, "logprobs": None,
                              "finish_reason": event.finish_reason}
    if event.logprobs:
        content = format_logprobs(tokenizer, event.logprobs, top_n)
        choice["logprobs"] = {"content": [lp.model_dump() for lp in content]}
    payload = {**head, "choices": [choice]}
    if usage_null:
        payload["usage"] = None
    return payload
