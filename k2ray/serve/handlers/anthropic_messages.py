"""POST /v1/messages: the Anthropic Messages API over the same chat path as OpenAI.

Tool-use ids are K2's own `functions.NAME:IDX` (the template renders them back verbatim), thinking
blocks carry an empty signature (nothing signs them here), and an absent `thinking` keeps K2 Thinking's
default (on). `input_tokens` excludes cache reads, which are reported as `cache_read_input_tokens`.
Tool use is grammar-constrained like OpenAI tool calls (prompting.chat_structured_output): `tool_use.input`
is always the parsed object (streamed as `input_json_delta` pieces that concatenate to it); only a call
cut by max_tokens can be incomplete, and the non-stream response leaves it out.
`tool_choice.disable_parallel_tool_use` allows one call (the grammar holds one; generation also ends right
after it, stop_reason `tool_use`). POST /v1/messages/count_tokens renders the
prompt exactly as /v1/messages does and returns its length.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response

from k2ray.api.anthropic_protocol import (
    AnthropicUsage,
    MessagesPrompt,
    MessagesRequest,
    MessagesResponse,
    MessageTokensCount,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from k2ray.serve.engine.engine_protocol import EngineRequest
from k2ray.serve.handlers.anthropic_stream import PING_FRAME, AnthropicStreamWriter
from k2ray.serve.http.errors import error_payload
from k2ray.serve.http.generation import ChoiceDecoder, FinishReason
from k2ray.serve.http.metering import anthropic_counts
from k2ray.serve.http.prompting import (
    ChatJob,
    ChatPrompt,
    chat_structured_output,
    render_chat_prompt,
    resolve_max_tokens,
)
from k2ray.serve.http.router_context import (
    RouterContext,
    StartedChoices,
    base_sampling_params,
    dispatch,
    failure_to_error,
    new_request_id,
)
from k2ray.serve.http.sse import sse_event

PromptT = TypeVar("PromptT", bound=MessagesPrompt)
_TOOL_CHOICE = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}


def stop_reason(finish: FinishReason | None, stop_sequence: str | None) -> str | None:
    if stop_sequence is not None:
        return "stop_sequence"
    return {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}.get(finish or "")


def _assistant_message(blocks: list[Any]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant",
                           "content": "".join(b.text for b in blocks if isinstance(b, TextBlock))}
    reasoning = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
    if reasoning:
        msg["reasoning_content"] = reasoning
    calls = [{"id": b.id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user_messages(blocks: list[Any]) -> list[dict[str, Any]]:
    # Tool results become K2 tool messages (in order), the user's own text follows them.
    out = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
           for b in blocks if isinstance(b, ToolResultBlock)]
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    if text or not out:
        out.append({"role": "user", "content": text})
    return out


def messages_job(req: MessagesPrompt) -> ChatJob:
    messages: list[dict[str, Any]] = []
    system = req.system_text()
    if system:
        messages.append({"role": "system", "content": system})
    for m in req.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "assistant":
            messages.append(_assistant_message(m.content))
        else:
            messages.extend(_user_messages(m.content))
    tools = None
    if req.tools:
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                    "parameters": t.input_schema}} for t in req.tools]
    choice = _TOOL_CHOICE[req.tool_choice.type] if req.tool_choice else "auto"
    forced = req.tool_choice.name if choice == "named" and req.tool_choice else None
    return ChatJob(messages, tools, choice if tools else "none", forced, req.is_thinking, req.max_tool_calls != 1)


def usage(num_prompt: int, decoder: ChoiceDecoder) -> AnthropicUsage:
    cached = decoder.num_cached_tokens
    return AnthropicUsage(input_tokens=num_prompt - cached, output_tokens=decoder.num_completion_tokens,
                          cache_read_input_tokens=cached)


def prepare(ctx: RouterContext, model: type[PromptT], body: bytes) -> tuple[PromptT, ChatPrompt]:
    """Body -> validated request and prompt token ids: the CPU part, run off the loop for big bodies."""
    req = ctx.parse(model, body)
    ctx.check_model(req.model)
    return req, render_chat_prompt(messages_job(req), ctx.template, ctx.tokenizer)


async def messages(ctx: RouterContext, body: bytes) -> Response:
    req, prompt = await ctx.off_loop(len(body), prepare, ctx, MessagesRequest, body)
    max_tokens = resolve_max_tokens(len(prompt.token_ids), req.max_tokens, ctx.max_model_len)
    params = base_sampling_params(ctx, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  min_p=None, seed=None, max_tokens=max_tokens, logprobs=None)
    constraint = chat_structured_output(messages_job(req), prompt, False, None, max_tokens, ctx.limits)
    params = replace(params, structured_output=constraint)
    request_id = new_request_id("msg_")
    requests = [EngineRequest(f"{request_id}-0", prompt.token_ids, params, ctx.injection(req.k2ray_test))]
    decoders = [ChoiceDecoder(0, ctx.tokenizer, prompt.new_parser(), req.stop_sequences or [], False, False)]
    decoders[0].limit_tool_calls(req.max_tool_calls)
    num_prompt = len(prompt.token_ids)
    return await dispatch(
        ctx, requests, decoders, stream=req.stream, request_id=request_id,
        usage=lambda: anthropic_counts(usage(num_prompt, decoders[0]), decoders[0].num_reasoning_tokens),
        collect=lambda started: _collect(req, request_id, num_prompt, started, decoders[0]),
        stream_body=lambda started: _stream(req, request_id, num_prompt, started, decoders[0]))


async def count_tokens(ctx: RouterContext, body: bytes) -> Response:
    _, prompt = await ctx.off_loop(len(body), prepare, ctx, MessagesPrompt, body)
    return JSONResponse(MessageTokensCount(input_tokens=len(prompt.token_ids)).model_dump())


async def _collect(req: MessagesRequest, request_id: str, num_prompt: int, started: StartedChoices,
                   decoder: ChoiceDecoder) -> JSONResponse:
    reasoning, text, finish, stop_sequence = "", "", None, None
    async for event in started.events():
        if event.failure is not None:
            raise failure_to_error(event.failure)
        reasoning += event.reasoning
        text += event.content
        finish = event.finish_reason or finish
        stop_sequence = event.stop_sequence or stop_sequence
    content: list[Any] = []
    if reasoning:
        content.append(ThinkingBlock(type="thinking", thinking=reasoning))
    if text:
        content.append(TextBlock(type="text", text=text))
    for call in decoder.tool_calls:
        tool_input = parse_tool_input(call.arguments)
        if tool_input is not None:
            content.append(ToolUseBlock(type="tool_use", id=call.id, name=call.name, input=tool_input))
    response = MessagesResponse(id=request_id, model=req.model, content=content,
                                stop_reason=stop_reason(finish, stop_sequence), stop_sequence=stop_sequence,
                                usage=usage(num_prompt, decoder))
    return JSONResponse(response.model_dump())


def parse_tool_input(arguments: str) -> dict[str, Any] | None:
    """The call's input object; None for arguments that are not one (a call cut by max_tokens: the
    grammar admits nothing else)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


async def _stream(req: MessagesRequest, request_id: str, num_prompt: int, started: StartedChoices,
                  decoder: ChoiceDecoder) -> AsyncIterator[str]:
    writer = AnthropicStreamWriter()
    finish, stop_sequence = None, None
    first = True
    async for event in started.events():
        if first:
            first = False
            message = {"id": request_id, "type": "message", "role": "assistant", "model": req.model,
                       "content": [], "stop_reason": None, "stop_sequence": None,
                       "usage": usage(num_prompt, decoder).model_dump() | {"output_tokens": 0}}
            # Anthropic's own stream sends a ping right after message_start; clients skip it.
            yield sse_event("message_start", {"type": "message_start", "message": message}) + PING_FRAME
        if event.failure is not None:
            yield sse_event("error", error_payload(failure_to_error(event.failure), "anthropic"))
            return
        for frame in writer.feed(event):
            yield frame
        finish = event.finish_reason or finish
        stop_sequence = event.stop_sequence or stop_sequence
    for frame in writer.close():
        yield frame
    final_usage = usage(num_prompt, decoder).model_dump()
    yield sse_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason(finish, stop_sequence),
                                                "stop_sequence": stop_sequence},
                                      "usage": final_usage})
    yield sse_event("message_stop", {"type": "message_stop"})
