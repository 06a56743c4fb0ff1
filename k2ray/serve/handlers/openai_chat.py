"""POST /v1/chat/completions: OpenAI chat (with Moonshot's reasoning_content, partial mode, cached_tokens).

`response_format` json_object / json_schema and tool calls (declared names, schema-valid arguments,
tool_choice, `parallel_tool_calls: false`) are enforced by the engine's grammar-constrained decoding
(xgrammar; see prompting.chat_structured_output): with thinking on, the grammar applies from `</think>`
on. A response format is refused with partial mode (as Moonshot does) and yields to a forced tool call
(tool_choice required/named), as in vLLM.

`$web_search` (`{"type": "builtin_function", "function": {"name": "$web_search"}}`) is declared to the model as
a search function. `tools.web_search.mode: moonshot`: the call ends the response (finish_reason `tool_calls`),
the client echoes its arguments as the tool message and the next request runs the search; `server`: the
router runs the searches inside the request (web_search_loop.py). Usage then has `server_tool_use`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse, Response

from k2ray.api.openai_protocol import ChatCompletionRequest, NamedToolChoice
from k2ray.api.openai_responses import (
    ChatChoice,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ResponseMessage,
    ServerToolUse,
    ToolCallOut,
    Usage,
)
from k2ray.api.output_parser import ToolCall
from k2ray.sampling_params import StructuredOutputParams
from k2ray.serve.engine.engine_protocol import EngineRequest
from k2ray.serve.handlers.openai_format import chunk_payload, format_logprobs, role_payload, usage_payload
from k2ray.serve.http.errors import error_payload, invalid_request
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
from k2ray.serve.search.echoed_search import EchoedSearches
from k2ray.serve.search.web_search_loop import RoundBuilder, RoundPlan, SearchLoop
from k2ray.serve.search.web_search_tools import (
    SearchTool,
    openai_declared_tools,
    openai_search_tool,
)

if TYPE_CHECKING:
    from k2ray.sampling_params import SamplingParams
    from k2ray.serve.test_hooks import Injection


@dataclass(frozen=True)
class _Outputs:
    """What a response reports of its choices: usage, a choice's tool calls, whether all are finished."""

    usage: Callable[[], Usage]
    tool_calls: Callable[[int], list[ToolCall]]
    is_finished: Callable[[], bool]


def _choice_outputs(num_prompt: int, decoders: list[ChoiceDecoder], echoed: EchoedSearches | None) -> _Outputs:
    """`echoed`: the request's `$web_search` runs (Moonshot's protocol); None when the tool is not declared."""
    def usage() -> Usage:
        if echoed is None:
            return usage_payload(num_prompt, decoders)
        out = usage_payload(echoed.num_prompt_tokens, decoders)
        out.server_tool_use = ServerToolUse(web_search_requests=echoed.num_billed)
        return out

    return _Outputs(usage, lambda i: decoders[i].tool_calls, lambda: all(d.finished for d in decoders))


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
    tools = openai_declared_tools([t.model_dump(exclude_none=True) for t in req.tools]) if req.tools else None
    choice = req.tool_choice or "auto"
    forced = None
    if isinstance(choice, NamedToolChoice):
        forced, choice = choice.function.name, "named"
    return ChatJob(messages, tools, choice if tools else "none", forced, req.is_thinking,
                   req.parallel_tool_calls, req.constrain_tool_calls)


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
    search = openai_search_tool(req.tools, ctx.web_search)
    is_server_loop = search is not None and ctx.web_search is not None and ctx.web_search.config.mode == "server"
    max_tokens = resolve_max_tokens(len(prompt.token_ids), req.requested_max_tokens, ctx.max_model_len)
    params = base_sampling_params(
        ctx, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        max_tokens=max_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
    injection = ctx.injection(req.k2ray_test)
    request_id = new_request_id("chatcmpl-")
    if is_server_loop and search is not None:
        return await _search_loop(ctx, req, job, search, params, injection, request_id, max_tokens)
    params = replace(params, structured_output=structured_output(ctx, req, job, prompt, max_tokens))
    requests = [EngineRequest(f"{request_id}-{i}", prompt.token_ids, p, injection)
                for i, p in enumerate(fan_out(params, req.n))]
    decoders = [ChoiceDecoder(i, ctx.tokenizer, prompt.new_parser(), req.stop_list(), False, req.logprobs)
                for i in range(req.n)]
    for decoder in decoders:
        decoder.limit_tool_calls(None if req.parallel_tool_calls else 1)
    echoed = None
    if search is not None and ctx.web_search is not None:  # Moonshot's protocol: echoed calls search now
        echoed = EchoedSearches(ctx.web_search, job, prompt, lambda j: render_chat_prompt(j, ctx.template, ctx.tokenizer),
                                req.requested_max_tokens)
    outputs = _choice_outputs(len(prompt.token_ids), decoders, echoed)
    return await dispatch(
        ctx, requests, decoders, stream=req.stream, start=echoed.start if echoed is not None else None,
        num_max_searches=echoed.max_searches if echoed is not None else 0,
        request_id=request_id, usage=lambda: openai_counts(outputs.usage()),
        collect=lambda started: _collect(ctx, req, request_id, started, outputs),
        stream_body=lambda started: _stream(ctx, req, request_id, started, outputs))


def _round_builder(ctx: RouterContext, req: ChatCompletionRequest, params: SamplingParams,
                   injection: Injection | None, request_id: str) -> RoundBuilder:
    """A search loop's rounds: the conversation so far rendered, with what is left of max_tokens."""
    def build(job: ChatJob, round_index: int, num_tokens_left: int) -> RoundPlan | None:
        prompt = render_chat_prompt(job, ctx.template, ctx.tokenizer)
        max_tokens = min(num_tokens_left, ctx.max_model_len - len(prompt.token_ids))
        if max_tokens <= 0:
            return None
        round_params = replace(params, max_tokens=max_tokens,
                               structured_output=structured_output(ctx, req, job, prompt, max_tokens))
        suffix = "" if round_index == 0 else f"-search{round_index}"
        request = EngineRequest(f"{request_id}-0{suffix}", prompt.token_ids, round_params,
                                injection.for_round(round_index) if injection is not None else None)
        decoder = ChoiceDecoder(0, ctx.tokenizer, prompt.new_parser(), req.stop_list(), False, req.logprobs)
        decoder.limit_tool_calls(None if req.parallel_tool_calls else 1)
        return RoundPlan(request, decoder, len(prompt.token_ids))
    return build


async def _search_loop(ctx: RouterContext, req: ChatCompletionRequest, job: ChatJob, search: SearchTool,
                       params: SamplingParams, injection: Injection | None, request_id: str,
                       max_tokens: int) -> Response:
    """`tools.web_search.mode: server`: the router runs the model's searches and continues generation."""
    if req.n != 1:
        raise invalid_request("$web_search in server mode takes n=1", param="n")
    if job.messages[-1].get("partial"):
        raise invalid_request("$web_search in server mode cannot be combined with partial mode", param="messages")
    if ctx.web_search is None:
        raise RuntimeError("a server-mode search loop without a web search provider")
    build = _round_builder(ctx, req, params, injection, request_id)
    first = build(job, 0, max_tokens)
    if first is None:  # resolve_max_tokens leaves room for round 0
        raise RuntimeError("no output budget for the search loop's first round")
    loop = SearchLoop(ctx.web_search, search, job, first, build, max_tokens)
    outputs = _Outputs(loop.openai_usage, lambda _: loop.tool_calls(), lambda: loop.is_finished)
    return await dispatch(
        ctx, [first.request], [first.decoder], stream=req.stream, request_id=request_id,
        usage=lambda: openai_counts(loop.openai_usage()), start=loop.start, num_max_searches=search.max_searches,
        collect=lambda started: _collect(ctx, req, request_id, started, outputs),
        stream_body=lambda started: _stream(ctx, req, request_id, started, outputs))


async def _collect(ctx: RouterContext, req: ChatCompletionRequest, request_id: str, started: StartedChoices,
                   outputs: _Outputs) -> JSONResponse:
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
                 for c in outputs.tool_calls(i)][: None if req.parallel_tool_calls else 1]
        logprobs = None
        if req.logprobs:
            logprobs = ChoiceLogprobs(content=format_logprobs(ctx.tokenizer, for_logprobs[i], req.top_logprobs or 0))
        message = ResponseMessage(content=acc.content if (acc.content or not calls) else None,
                                  reasoning_content=acc.reasoning or None, tool_calls=calls or None)
        choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=acc.finish_reason))
    response = ChatCompletionResponse(id=request_id, created=int(time.time()), model=req.model, choices=choices,
                                      usage=outputs.usage())
    return JSONResponse(response.model_dump(exclude_none=True))


async def _stream(ctx: RouterContext, req: ChatCompletionRequest, request_id: str, started: StartedChoices,
                  outputs: _Outputs) -> AsyncIterator[str]:
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
        if held and not outputs.is_finished():
            yield held
            held = ""
    if req.include_usage:
        held += sse_data({**head, "choices": [], "usage": outputs.usage().model_dump(exclude_none=True)})
    yield held + SSE_DONE
