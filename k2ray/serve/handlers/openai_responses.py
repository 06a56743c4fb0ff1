"""POST /v1/responses: the OpenAI Responses API over the chat path.

The request is translated into the chat completions request it means (responses_protocol.to_chat_request),
so prompt rendering, the tool-call and JSON grammars (tool_choice, `parallel_tool_calls`, `text.format`),
generation, admission and metering are the chat path's own; only the output shape differs: `reasoning`,
`message` and `function_call` items (responses_stream), usage as input/output tokens. Call ids are K2's
`functions.NAME:IDX`, which the template renders back from `function_call_output` items. k2ray stores no
responses, so `store: true`, `previous_response_id`, `conversation` and `background` are a 400.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from k2ray.api.openai_protocol import ChatCompletionRequest
from k2ray.api.openai_responses import Usage
from k2ray.api.responses_protocol import ResponsesRequest, to_chat_request
from k2ray.serve.engine.engine_protocol import EngineRequest
from k2ray.serve.handlers.openai_chat import chat_job, structured_output
from k2ray.serve.handlers.openai_format import usage_payload
from k2ray.serve.handlers.responses_stream import ResponseItemsWriter
from k2ray.serve.http.errors import ApiError, invalid_request
from k2ray.serve.http.generation import ChoiceDecoder, FinishReason
from k2ray.serve.http.metering import openai_counts
from k2ray.serve.http.prompting import ChatJob, ChatPrompt, render_chat_prompt, resolve_max_tokens
from k2ray.serve.http.router_context import (
    RouterContext,
    StartedChoices,
    base_sampling_params,
    dispatch,
    failure_to_error,
    new_request_id,
)
from k2ray.serve.http.sse import sse_event

_STATEFUL = {"previous_response_id": "previous responses", "conversation": "conversations",
             "background": "background responses"}
_INCOMPLETE = {"reason": "max_output_tokens"}


def check_stateless(req: ResponsesRequest) -> None:
    if req.store:
        raise invalid_request("store=true is not supported: k2ray keeps no responses; send store=false (or leave "
                              "it out) and pass the whole conversation in `input`", param="store")
    for name, what in _STATEFUL.items():
        if getattr(req, name):
            raise invalid_request(f"{name} is not supported: k2ray keeps no {what}; pass the whole conversation "
                                  f"in `input`", param=name)


def prepare(ctx: RouterContext, body: bytes) -> tuple[ResponsesRequest, ChatCompletionRequest, ChatJob, ChatPrompt]:
    """Body -> validated request, its chat form and prompt token ids: the CPU part, off the loop for big bodies."""
    req = ctx.parse(ResponsesRequest, body)
    check_stateless(req)
    ctx.check_model(req.model)
    try:
        chat = to_chat_request(req)
    except ValidationError as exc:  # input with no chat turn in it (reasoning items alone, ...)
        raise invalid_request(f"Invalid request: input: {exc.errors()[0]['msg']}", param="input") from None
    except ValueError as exc:  # an input item with no chat form (an image part, ...)
        raise invalid_request(f"Invalid request: {exc}", param="input") from None
    job = chat_job(chat)
    return req, chat, job, render_chat_prompt(job, ctx.template, ctx.tokenizer)


def usage_object(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens,
            # Every prompt block is cached by the engine at no charge: nothing counts as a cache write.
            "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.completion_tokens_details.reasoning_tokens},
            "total_tokens": usage.total_tokens}


@dataclass
class ResponseShape:
    """What every snapshot of one response repeats: the request's settings, echoed as OpenAI does."""

    req: ResponsesRequest
    request_id: str
    created_at: int
    num_prompt_tokens: int
    decoder: ChoiceDecoder

    def snapshot(self, status: str, output: list[dict[str, Any]], *, is_final: bool) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
        return {
            "id": self.request_id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False, "error": None,
            "incomplete_details": _INCOMPLETE if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": req.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                          "summary": req.reasoning.summary if req.reasoning else None},
            "store": False, "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": _tool_choice(req), "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
            "usage": usage_object(usage_payload(self.num_prompt_tokens, [self.decoder])) if is_final else None,
            "user": req.user, "metadata": req.metadata or {},
        }


def _tool_choice(req: ResponsesRequest) -> Any:
    if req.tool_choice is None:
        return "auto"
    return req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump()


async def responses(ctx: RouterContext, body: bytes) -> Response:
    req, chat, job, prompt = await ctx.off_loop(len(body), prepare, ctx, body)
    max_tokens = resolve_max_tokens(len(prompt.token_ids), chat.requested_max_tokens, ctx.max_model_len)
    params = base_sampling_params(ctx, temperature=req.temperature, top_p=req.top_p, top_k=None, min_p=None,
                                  seed=req.seed, max_tokens=max_tokens, logprobs=None)
    params = replace(params, structured_output=structured_output(ctx, chat, job, prompt, max_tokens))
    request_id = new_request_id("resp_")
    requests = [EngineRequest(f"{request_id}-0", prompt.token_ids, params, ctx.injection(req.k2ray_test))]
    decoder = ChoiceDecoder(0, ctx.tokenizer, prompt.new_parser(), [], False, False)
    decoder.limit_tool_calls(req.max_calls)
    num_prompt = len(prompt.token_ids)
    shape = ResponseShape(req, request_id, int(time.time()), num_prompt, decoder)
    return await dispatch(
        ctx, requests, [decoder], stream=req.stream, request_id=request_id,
        usage=lambda: openai_counts(usage_payload(num_prompt, [decoder])),
        collect=lambda started: _collect(shape, started),
        stream_body=lambda started: _stream(shape, started))


def _final_status(finish: FinishReason | None) -> str:
    return "incomplete" if finish == "length" else "completed"


async def _collect(shape: ResponseShape, started: StartedChoices) -> JSONResponse:
    writer = ResponseItemsWriter(shape.req.max_calls)
    finish = None
    async for event in started.events():
        if event.failure is not None:
            raise failure_to_error(event.failure)
        writer.feed(event)
        finish = event.finish_reason or finish
    status = _final_status(finish)
    writer.close(status == "completed")
    return JSONResponse(shape.snapshot(status, writer.output, is_final=True))


def _frames(events: list[dict[str, Any]]) -> str:
    return "".join(sse_event(e["type"], e) for e in events)


def _failed(shape: ResponseShape, writer: ResponseItemsWriter, err: ApiError) -> dict[str, Any]:
    response = shape.snapshot("failed", writer.output, is_final=True)
    response["error"] = {"code": "invalid_prompt" if err.status == 400 else "server_error", "message": err.message}
    return writer.event("response.failed", response=response)


async def _stream(shape: ResponseShape, started: StartedChoices) -> AsyncIterator[str]:
    writer = ResponseItemsWriter(shape.req.max_calls)
    opening = shape.snapshot("in_progress", [], is_final=False)
    events = [writer.event("response.created", response=opening),
              writer.event("response.in_progress", response=opening)]
    finish = None
    async for event in started.events():
        if event.failure is not None:
            yield _frames([*events, _failed(shape, writer, failure_to_error(event.failure))])
            return
        events += writer.feed(event)
        finish = event.finish_reason or finish
        if events and finish is None:
            yield _frames(events)
            events = []
    status = _final_status(finish)
    events += writer.close(status == "completed")
    done = "response.completed" if status == "completed" else "response.incomplete"
    events.append(writer.event(done, response=shape.snapshot(status, writer.output, is_final=True)))
    yield _frames(events)
