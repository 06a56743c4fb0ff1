"""POST /v1/completions: raw-prompt completions (no chat template, no output parser)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response

from k2ray.api.openai_protocol import CompletionRequest
from k2ray.api.openai_responses import CompletionChoice, CompletionResponse
from k2ray.serve.engine.engine_protocol import EngineRequest
from k2ray.serve.handlers.openai_format import completion_logprobs, usage_payload
from k2ray.serve.http.errors import error_payload
from k2ray.serve.http.generation import ChoiceDecoder
from k2ray.serve.http.metering import openai_counts
from k2ray.serve.http.prompting import fan_out, resolve_max_tokens
from k2ray.serve.http.router_context import (
    RouterContext,
    StartedChoices,
    base_sampling_params,
    dispatch,
    failure_to_error,
    new_request_id,
)
from k2ray.serve.http.sse import SSE_DONE, ChunkFramer, sse_data

Prompt = str | list[str] | list[int] | list[list[int]]


def num_prompts(prompt: Prompt) -> int:
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def prompt_token_ids(ctx: RouterContext, prompt: Prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [ctx.tokenizer.encode(prompt)]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return [ctx.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]


def prepare(ctx: RouterContext, body: bytes) -> tuple[CompletionRequest, list[list[int]], list[str]]:
    """Body -> validated request, each prompt's token ids and echo text: the CPU part, run off the loop
    for big bodies. The fan-out is bounded before anything is tokenized."""
    req = ctx.parse(CompletionRequest, body)
    ctx.check_model(req.model)
    ctx.check_fan_out(num_prompts(req.prompt), req.n)
    prompts = prompt_token_ids(ctx, req.prompt)
    return req, prompts, [ctx.tokenizer.decode(ids) if req.echo else "" for ids in prompts]


async def completions(ctx: RouterContext, body: bytes) -> Response:
    req, prompts, echoes = await ctx.off_loop(len(body), prepare, ctx, body)
    budgets = [resolve_max_tokens(len(ids), req.max_tokens, ctx.max_model_len) for ids in prompts]
    injection = ctx.injection(req.k2ray_test)
    request_id = new_request_id("cmpl-")
    requests, decoders = [], []
    for p, (ids, budget) in enumerate(zip(prompts, budgets, strict=True)):
        params = base_sampling_params(
            ctx, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
            max_tokens=budget, logprobs=req.logprobs, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
        for j, choice_params in enumerate(fan_out(params, req.n)):
            index = p * req.n + j
            requests.append(EngineRequest(f"{request_id}-{index}", ids, choice_params, injection))
            decoders.append(ChoiceDecoder(index, ctx.tokenizer, None, req.stop_list(), False,
                                          req.logprobs is not None))
    num_prompt = sum(len(ids) for ids in prompts)
    return await dispatch(
        ctx, requests, decoders, stream=req.stream,
        request_id=request_id, usage=lambda: openai_counts(usage_payload(num_prompt, decoders, len(prompts))),
        collect=lambda started: _collect(ctx, req, request_id, num_prompt, len(prompts), echoes, started, decoders),
        stream_body=lambda started: _stream(ctx, req, request_id, num_prompt, len(prompts), echoes, started,
                                            decoders))


async def _collect(ctx: RouterContext, req: CompletionRequest, request_id: str, num_prompt: int, num_prompts: int,
                   echoes: list[str], started: StartedChoices, decoders: list[ChoiceDecoder]) -> JSONResponse:
    finish: dict[int, str | None] = {}
    tokens: dict[int, list[tuple[int, dict[int, float]]]] = {d.index: [] for d in decoders}
    async for event in started.events():
        if event.failure is not None:
            raise failure_to_error(event.failure)
        finish[event.index] = event.finish_reason or finish.get(event.index)
        tokens[event.index].extend(event.logprobs)
    choices = []
    for d in decoders:
        echo = echoes[d.index // req.n]
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(ctx.tokenizer, tokens[d.index], req.logprobs, len(echo))
        choices.append(CompletionChoice(index=d.index, text=echo + d.text, logprobs=logprobs,
                                        finish_reason=finish.get(d.index)))
    response = CompletionResponse(id=request_id, created=int(time.time()), model=req.model, choices=choices,
                                  usage=usage_payload(num_prompt, decoders, num_prompts))
    return JSONResponse(response.model_dump(exclude_none=True))


async def _stream(ctx: RouterContext, req: CompletionRequest, request_id: str, num_prompt: int, num_prompts: int,
                  echoes: list[str], started: StartedChoices, decoders: list[ChoiceDecoder]) -> AsyncIterator[str]:
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": req.model}
    framer = ChunkFramer(head, usage_null=req.include_usage)
    offsets = {d.index: len(echoes[d.index // req.n]) for d in decoders}
    echoed: set[int] = set()
    held = ""
    async for event in started.events():
        if event.failure is not None:
            yield held + sse_data(error_payload(failure_to_error(event.failure), "openai"))
            return
        text = event.content
        first = event.index not in echoed
        if first:  # the first chunk goes out even while its bytes are an incomplete character (TTFT)
            echoed.add(event.index)
            text = echoes[event.index // req.n] + text
        elif not text and event.finish_reason is None:
            continue
        choice = {"index": event.index, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
        if req.logprobs is not None and event.logprobs:
            lp = completion_logprobs(ctx.tokenizer, event.logprobs, req.logprobs, offsets[event.index])
            offsets[event.index] += sum(len(t) for t in lp.tokens)
            choice["logprobs"] = lp.model_dump()
        held += framer.frame(choice)
        if not all(d.finished for d in decoders):  # the last chunk leaves with usage and [DONE]
            yield held
            held = ""
    if req.include_usage:
        held += sse_data({**head, "choices": [], "usage": usage_payload(num_prompt, decoders, num_prompts).model_dump()})
    yield held + SSE_DONE
