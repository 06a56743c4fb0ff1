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
The server tool `web_search_20250305` runs in the router's search loop (web_search_loop.py): its searches come
back as `server_tool_use` and `web_search_tool_result` blocks, counted in `usage.server_tool_use`; echoed in
later turns, they are rendered back as the model read them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.responses import JSONResponse, Response

from k2ray.api.anthropic_protocol import (
    AnthropicUsage,
    MessagesPrompt,
    MessagesRequest,
    MessagesResponse,
    MessageTokensCount,
    ServerToolUseBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    WebSearchToolResultBlock,
)
from k2ray.api.output_parser import ToolCall
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
from k2ray.serve.search.web_search_loop import RoundBuilder, RoundPlan, SearchLoop
from k2ray.serve.search.web_search_tools import (
    SearchTool,
    anthropic_assistant_turns,
    anthropic_function,
    anthropic_search_tool,
    call_arguments,
)
from k2ray.tools import WebSearchConfig

if TYPE_CHECKING:
    from k2ray.sampling_params import SamplingParams
    from k2ray.serve.test_hooks import Injection

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
    calls += [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": call_arguments(b)}}
              for b in blocks if isinstance(b, ServerToolUseBlock)]
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


def messages_job(req: MessagesPrompt, search_config: WebSearchConfig | None = None) -> ChatJob:
    """`search_config` bounds the echoed search results rendered into the prompt (None: the defaults)."""
    messages: list[dict[str, Any]] = []
    system = req.system_text()
    if system:
        messages.append({"role": "system", "content": system})
    for m in req.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "assistant" and any(isinstance(b, WebSearchToolResultBlock) for b in m.content):
            messages.extend(anthropic_assistant_turns(m.content, _assistant_message, search_config or WebSearchConfig()))
        elif m.role == "assistant":
            messages.append(_assistant_message(m.content))
        else:
            messages.extend(_user_messages(m.content))
    tools = None
    if req.tools:
        tools = [anthropic_function(t) for t in req.tools]
    choice = _TOOL_CHOICE[req.tool_choice.type] if req.tool_choice else "auto"
    forced = req.tool_choice.name if choice == "named" and req.tool_choice else None
    return ChatJob(messages, tools, choice if tools else "none", forced, req.is_thinking, req.max_tool_calls != 1)


def usage(num_prompt: int, decoder: ChoiceDecoder) -> AnthropicUsage:
    cached = decoder.num_cached_tokens
    return AnthropicUsage(input_tokens=num_prompt - cached, output_tokens=decoder.num_completion_tokens,
                          cache_read_input_tokens=cached)


def _search_config(ctx: RouterContext) -> WebSearchConfig | None:
    return ctx.web_search.config if ctx.web_search is not None else None


def prepare(ctx: RouterContext, model: type[PromptT], body: bytes) -> tuple[PromptT, ChatPrompt]:
    """Body -> validated request and prompt token ids: the CPU part, run off the loop for big bodies."""
    req = ctx.parse(model, body)
    ctx.check_model(req.model)
    return req, render_chat_prompt(messages_job(req, _search_config(ctx)), ctx.template, ctx.tokenizer)


# A response's usage and the client's tool calls: of its one choice, or of a search loop's rounds.
UsageFn = Callable[[], AnthropicUsage]
CallsFn = Callable[[], list[ToolCall]]


async def messages(ctx: RouterContext, body: bytes) -> Response:
    req, prompt = await ctx.off_loop(len(body), prepare, ctx, MessagesRequest, body)
    search = anthropic_search_tool(req.tools, ctx.web_search)
    max_tokens = resolve_max_tokens(len(prompt.token_ids), req.max_tokens, ctx.max_model_len)
    params = base_sampling_params(ctx, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  min_p=None, seed=None, max_tokens=max_tokens, logprobs=None)
    request_id = new_request_id("msg_")
    injection = ctx.injection(req.k2ray_test)
    job = messages_job(req, _search_config(ctx))
    first = _plan(ctx, req, params, injection, request_id, job, prompt, 0, max_tokens)
    if search is not None:
        return await _search_loop(ctx, req, request_id, search, job, first,
                                  _round_builder(ctx, req, params, injection, request_id), max_tokens)
    decoder = first.decoder

    def usage_fn() -> AnthropicUsage:
        return usage(first.num_prompt_tokens, decoder)

    return await dispatch(
        ctx, [first.request], [decoder], stream=req.stream, request_id=request_id,
        usage=lambda: anthropic_counts(usage_fn(), decoder.num_reasoning_tokens),
        collect=lambda started: _collect(req, request_id, started, usage_fn, lambda: decoder.tool_calls),
        stream_body=lambda started: _stream(req, request_id, started, usage_fn))


def _plan(ctx: RouterContext, req: MessagesRequest, params: SamplingParams, injection: Injection | None,
          request_id: str, job: ChatJob, prompt: ChatPrompt, round_index: int, max_tokens: int) -> RoundPlan:
    """One generation round (a search loop's round `round_index`; 0 for every other request)."""
    constraint = chat_structured_output(job, prompt, False, None, max_tokens, ctx.limits)
    suffix = "" if round_index == 0 else f"-search{round_index}"
    request = EngineRequest(f"{request_id}-0{suffix}", prompt.token_ids,
                            replace(params, max_tokens=max_tokens, structured_output=constraint),
                            injection.for_round(round_index) if injection is not None else None)
    decoder = ChoiceDecoder(0, ctx.tokenizer, prompt.new_parser(), req.stop_sequences or [], False, False)
    decoder.limit_tool_calls(req.max_tool_calls)
    return RoundPlan(request, decoder, len(prompt.token_ids))


def _round_builder(ctx: RouterContext, req: MessagesRequest, params: SamplingParams, injection: Injection | None,
                   request_id: str) -> RoundBuilder:
    def build(job: ChatJob, round_index: int, num_tokens_left: int) -> RoundPlan | None:
        prompt = render_chat_prompt(job, ctx.template, ctx.tokenizer)
        max_tokens = min(num_tokens_left, ctx.max_model_len - len(prompt.token_ids))
        if max_tokens <= 0:
            return None
        return _plan(ctx, req, params, injection, request_id, job, prompt, round_index, max_tokens)
    return build


async def _search_loop(ctx: RouterContext, req: MessagesRequest, request_id: str, search: SearchTool, job: ChatJob,
                       first: RoundPlan, build: RoundBuilder, max_tokens: int) -> Response:
    """`web_search_20250305`: the router runs the model's searches and continues generation."""
    if ctx.web_search is None:  # anthropic_search_tool refused the tool otherwise
        raise RuntimeError("a web_search server tool without a web search provider")
    loop = SearchLoop(ctx.web_search, search, job, first, build, max_tokens)
    return await dispatch(
        ctx, [first.request], [first.decoder], stream=req.stream, request_id=request_id, start=loop.start,
        num_max_searches=search.max_searches,
        usage=lambda: anthropic_counts(loop.anthropic_usage(), loop.num_reasoning_tokens),
        collect=lambda started: _collect(req, request_id, started, loop.anthropic_usage, loop.tool_calls),
        stream_body=lambda started: _stream(req, request_id, started, loop.anthropic_usage))


async def count_tokens(ctx: RouterContext, body: bytes) -> Response:
    _, prompt = await ctx.off_loop(len(body), prepare, ctx, MessagesPrompt, body)
    return JSONResponse(MessageTokensCount(input_tokens=len(prompt.token_ids)).model_dump())


async def _collect(req: MessagesRequest, request_id: str, started: StartedChoices, usage_fn: UsageFn,
                   tool_calls: CallsFn) -> JSONResponse:
    content: list[Any] = []
    reasoning, text, finish, stop_sequence = "", "", None, None
    async for event in started.events():
        if event.failure is not None:
            raise failure_to_error(event.failure)
        reasoning += event.reasoning
        text += event.content
        finish = event.finish_reason or finish
        stop_sequence = event.stop_sequence or stop_sequence
        if event.searches:  # a search round ends: its blocks, then the searches'
            content += _text_blocks(reasoning, text)
            reasoning, text = "", ""
            for search in event.searches:
                content += [ServerToolUseBlock(**search.server_tool_use_block()),
                            WebSearchToolResultBlock(**search.result_block())]
    content += _text_blocks(reasoning, text)
    for call in tool_calls():
        tool_input = parse_tool_input(call.arguments)
        if tool_input is not None:
            content.append(ToolUseBlock(type="tool_use", id=call.id, name=call.name, input=tool_input))
    response = MessagesResponse(id=request_id, model=req.model, content=content,
                                stop_reason=stop_reason(finish, stop_sequence), stop_sequence=stop_sequence,
                                usage=usage_fn())
    return JSONResponse(response.model_dump())


def _text_blocks(reasoning: str, text: str) -> list[Any]:
    blocks: list[Any] = []
    if reasoning:
        blocks.append(ThinkingBlock(type="thinking", thinking=reasoning))
    if text:
        blocks.append(TextBlock(type="text", text=text))
    return blocks


def parse_tool_input(arguments: str) -> dict[str, Any] | None:
    """The call's input object; None for arguments that are not one (a call cut by max_tokens: the
    grammar admits nothing else)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


async def _stream(req: MessagesRequest, request_id: str, started: StartedChoices,
                  usage_fn: UsageFn) -> AsyncIterator[str]:
    writer = AnthropicStreamWriter()
    finish, stop_sequence = None, None
    first = True
    async for event in started.events():
        if first:
            first = False
            message = {"id": request_id, "type": "message", "role": "assistant", "model": req.model,
                       "content": [], "stop_reason": None, "stop_sequence": None,
                       "usage": usage_fn().model_dump() | {"output_tokens": 0}}
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
    final_usage = usage_fn().model_dump()
    yield sse_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason(finish, stop_sequence),
                                                "stop_sequence": stop_sequence},
                                      "usage": final_usage})
    yield sse_event("message_stop", {"type": "message_stop"})
