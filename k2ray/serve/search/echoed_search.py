"""Moonshot's `$web_search` protocol (`tools.web_search.mode: moonshot`): the model's call ends a response with
finish_reason `tool_calls`; the client appends `{"role": "tool", "tool_call_id": ID, "name": "$web_search",
"content": <the call's arguments, unmodified>}` and calls again; that request runs the search and the results
take the tool message's place in the prompt, so their tokens are that request's prompt tokens.

The searches run in `dispatch`'s start hook, after the request passed its key's limits: a refused request
runs none. Each one that succeeds is billed in that request (`num_billed`); the calls of earlier turns were
billed when they ran and keep the content the client sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from k2ray.api.tool_call_parser import ToolCall
from k2ray.sampling_params import SamplingParams
from k2ray.serve.engine.engine_protocol import EngineRequest
from k2ray.serve.http.generation import ChoiceDecoder
from k2ray.serve.http.prompting import ChatJob, ChatPrompt, reasoning_budget, resolve_max_tokens
from k2ray.serve.http.router_context import RouterContext, StartedChoices, start_choices
from k2ray.serve.search.web_search_tools import OPENAI_SEARCH_NAME, over_limit
from k2ray.tools import WebSearch, format_tool_text


def _echoed(messages: list[dict[str, Any]]) -> list[int]:
    """Indices of the tool messages answering the last assistant message's `$web_search` calls."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return []
    search_ids = {c["id"] for c in messages[last].get("tool_calls") or []
                  if c["function"]["name"] == OPENAI_SEARCH_NAME}
    return [i for i in range(last + 1, len(messages))
            if messages[i]["role"] == "tool" and messages[i].get("tool_call_id") in search_ids]


def num_echoed_calls(messages: list[dict[str, Any]]) -> int:
    return len(_echoed(messages))


async def run_echoed_searches(messages: list[dict[str, Any]],
                              web_search: WebSearch) -> tuple[list[dict[str, Any]], int]:
    """The messages with the echoed calls answering the last assistant message searched, and how many
    searches succeeded; at most `max_rounds` run, later ones are told the limit is spent."""
    out, num_runs, num_billed = list(messages), 0, 0
    max_searches = web_search.config.max_rounds
    for i in _echoed(messages):
        message = messages[i]
        if num_runs >= max_searches:
            call = ToolCall(message["tool_call_id"], OPENAI_SEARCH_NAME, message["content"])
            out[i] = {**message, "content": over_limit(call, max_searches).text}
            continue
        num_runs += 1
        response = await web_search.run_call(message["content"])
        num_billed += response.is_ok
        out[i] = {**message, "content": format_tool_text(response, web_search.config)}
    return out, num_billed


class EchoedSearches:
    """One request's echoed searches; `start` is `dispatch`'s start hook."""

    def __init__(self, web_search: WebSearch, job: ChatJob, prompt: ChatPrompt,
                 render: Callable[[ChatJob], ChatPrompt], requested_max_tokens: int | None) -> None:
        self._web_search = web_search
        self._job = job
        self._render = render
        self._requested_max_tokens = requested_max_tokens
        self.num_prompt_tokens = len(prompt.token_ids)
        self.num_billed = 0
        # The echoed calls this request may search (the admission reserves their price).
        self.max_searches = min(web_search.config.max_rounds, num_echoed_calls(job.messages))

    async def start(self, ctx: RouterContext, requests: list[EngineRequest],
                    decoders: list[ChoiceDecoder]) -> StartedChoices:
        messages, self.num_billed = await run_echoed_searches(self._job.messages, self._web_search)
        if messages != self._job.messages:
            prompt = await ctx.off_loop(self.num_prompt_tokens, self._render, replace(self._job, messages=messages))
            # The results take room: a budget that no longer fits is a 400, billed nothing (no output).
            max_tokens = resolve_max_tokens(len(prompt.token_ids), self._requested_max_tokens, ctx.max_model_len)
            requests = [replace(r, prompt_token_ids=prompt.token_ids,
                                sampling_params=_with_max_tokens(ctx, r.sampling_params, max_tokens)) for r in requests]
            self.num_prompt_tokens = len(prompt.token_ids)
        return await start_choices(ctx, requests, decoders)


def _with_max_tokens(ctx: RouterContext, params: SamplingParams, max_tokens: int) -> SamplingParams:
    constraint = params.structured_output
    if constraint is not None and constraint.max_reasoning_tokens is not None:
        constraint = replace(constraint, max_reasoning_tokens=reasoning_budget(max_tokens, ctx.limits))
    return replace(params, max_tokens=max_tokens, structured_output=constraint)
