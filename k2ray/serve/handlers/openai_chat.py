"""POST /v1/chat/completions: OpenAI chat (with Moonshot's reasoning_content, partial mode, cached_tokens).

`response_format` json_object / json_schema and tool calls (declared names, schema-valid arguments,
tool_choice, `parallel_tool_calls: false`) are enforced by the engine's grammar-constrained decoding
(xgrammar; see prompting.chat_structured_output): with thinking on, the grammar applies from `</think>`
on. A response format is refused with partial mode (as Moonshot does) and yields to a forced tool call
(tool_choice required/named), as in vLLM.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi.responses import JSONResponse, Response

from k2ray.api.openai_protocol import ChatCompletionRequest, NamedToolChoice
from k2ray.api.openai_responses import (
    ChatChoice,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ResponseMessage,
    ToolCallOut,
)
from k2ray.sampling_params import StructuredOutputParams
from k2ray.serve.engine.engine_protocol import EngineRequest
from k2ray.serve.handlers.openai_format import chunk_payload, format_logprobs, role_payload, usage_payload
from k2ray.serve.http.errors import error_payload
from k2ray.serve.http.generation import ChoiceDecoder, ChoiceEvent
from k2ray.serve.http.metering import openai_counts
from k2ray.serve.http.prompting import (
    ChatJob,
    ChatPrompt,
    chat_structured_output,
    fan_out,
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
from k2ray.serve.http.sse import SSE_DONE, sse_data


def chat_job(req: ChatCompletionRequest) -> ChatJob:
    messages = []
    for m in req.messages:
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.reasoning_content or m.reasoning:
            msg["reasoning_content"] = m.reasoning_content or m.reasoning
        if m.partial:
            msg["partial"] = True
        messages.append(msg)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice or "auto"
    forced = None
    if isinstance(choice, NamedToolChoice):
        forced, choice = choice.function.name, "named"
    return ChatJob(messages, tools, choice if tools else "none", forced, req.is_thinking, req.parallel_tool_calls)


def structured_output(ctx: RouterContext, req: ChatCompletionRequest, job: ChatJob, prompt: ChatPrompt,
                      max_tokens: int) -> StructuredOutputParams | None:
    fmt = req.response_format
    is_json = fmt is not None and fmt.is_json
    schema = fmt.json_schema.json_schema if is_json and fmt.type == "json_schema" else None
    return chat_structured_output(job, prompt, is_json and schema is None, schema, max_tokens, ctx.limits)


def prepare(ctx: RouterContext, body: bytes) -> tuple[ChatCompletionRequest, ChatJob, ChatPrompt]:
    """Body -> validated request and prompt token ids: the CPU part, run off the loop for big bodies."""
    req = ctx.parse(ChatCompletionRequest, body)
    ctx.check_model(req.model)
    ctx.check_fan_out(1, req.n)
    job = chat_job(req)
    return req, job, render_chat_prompt(job, ctx.template, ctx.tokenizer)


async def chat_completions(ctx: RouterContext, body: bytes) -> Response:
    req, job, prompt = await ctx.off_loop(len(body), prepare, ctx, body)
    max_tokens = resolve_max_tokens(len(prompt.token_ids), req.requested_max_tokens, ctx.max_model_len)
    params = base_sampling_params(
        ctx, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        max_tokens=max_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
    params = replace(params, structured_output=structured_output(ctx, req, job, prompt, max_tokens))
    injection = ctx.injection(req.k2ray_test)
    request_id = new_request_id("chatcmpl-")
    requests = [EngineRequest(f"{request_id}-{i}", prompt.token_ids, p, injection)
                for i, p in enumerate(fan_out(params, req.n))]
    decoders = [ChoiceDecoder(i, ctx.tokenizer, prompt.new_parser(), req.stop_list(), False, req.logprobs)
                for i in range(req.n)]
    for decoder in decoders:
        decoder.limit_tool_calls(None if req.parallel_tool_calls else 1)
    num_prompt = len(prompt.token_ids)
    return await dispatch(
        ctx, requests, decoders, stream=req.stream,
        request_id=request_id, usage=lambda: openai_counts(usage_payload(num_prompt, decoders)),
        collect=lambda started: _collect(ctx, req, request_id, num_prompt, started, decoders),
        stream_body=lambda started: _stream(ctx, req, request_id, num_prompt, started, decoders))


async def _collect(ctx: RouterContext, req: ChatCompletionRequest, request_id: str, num_prompt: int,
                   started: StartedChoices, decoders: list[ChoiceDecoder]) -> JSONResponse:
    finals: list[ChoiceEvent] = [ChoiceEvent(i) for i in range(req.n)]
    for_logprobs: list[list[tuple[int, dict[int, float]]]] = [[] for _ in range(req.n)]
    async for event in started.events():
        if event.failure is not None:
            raise failure_to_error(event.failure)
        acc = finals[event.index]
        acc.reasoning += event.reasoning
        acc.content += event.content
        acc.finish_reason = event.finish_reason or acc.finish_reason
        for_logprobs[event.index].extend(event.logprobs)
    choices = []
    for i, acc in enumerate(finals):
        calls = [ToolCallOut(id=c.id, function={"name": c.name, "arguments": c.arguments})
                 for c in decoders[i].tool_calls][: None if req.parallel_tool_calls else 1]
        logprobs = None
        if req.logprobs:
            logprobs = ChoiceLogprobs(content=format_logprobs(ctx.tokenizer, for_logprobs[i], req.top_logprobs or 0))
        message = ResponseMessage(content=acc.content if (acc.content or not calls) else None,
                                  reasoning_content=acc.reasoning or None, tool_calls=calls or None)
        choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=acc.finish_reason))
    response = ChatCompletionResponse(id=request_id, created=int(time.time()), model=req.model, choices=choices,
                                      usage=usage_payload(num_prompt, decoders))
    return JSONResponse(response.model_dump(exclude_none=True))


async def _stream(ctx: RouterContext, req: ChatCompletionRequest, request_id: str, num_prompt: int,
                  started: StartedChoices, decoders: list[ChoiceDecoder]) -> AsyncIterator[str]:
    created = int(time.time())
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": req.model}
    usage_null = req.include_usage
    # Frames are joined into as few writes as possible without holding any back: the role chunks go
    # out with the first content chunk (already here), the last chunk with usage and [DONE].
    held = "".join(sse_data(role_payload(head, i, usage_null)) for i in range(req.n))
    async for event in started.events():
        if event.failure is not None:
            yield held + sse_data(error_payload(failure_to_error(event.failure), "openai"))
            return
        if not req.parallel_tool_calls:  # only the first call is delivered
            event.tool_calls = [d for d in event.tool_calls if d.index == 0]
        payload = chunk_payload(ctx.tokenizer, head, event, req.top_logprobs or 0, usage_null)
        if payload is not None:
            held += sse_data(payload)
        if held and not all(d.finished for d in decoders):
            yield held
            held = ""
    if req.include_usage:
        held += sse_data({**head, "choices": [], "usage": usage_payload(num_prompt, decoders).model_dump()})
    yield held + SSE_DONE
