"""The server-side search loop (`tools.web_search.mode: server`, and Anthropic's `web_search_20250305`): while
the model calls the search tool, the router runs the searches (k2ray/tools), appends the calls and their
results to the conversation in K2's format and generates the next round, all inside one HTTP request.

The client sees one response: the rounds' reasoning and text in order, the search calls hidden from OpenAI
clients (Anthropic clients get `server_tool_use` / `web_search_tool_result` blocks), the last round's finish.
A round continues the loop only when it ended with calls of the search tool alone; a forced tool choice
holds for the first round only; once the request's search limit is spent the next round is rendered
without the search tool, so the model answers. The request's max_tokens bounds all rounds together.

Metering (`usage_counts`, recorded once by `dispatch`): every round whose engine request started counts its
prompt (search results included, as Moonshot counts them), the engine's cache hits and its output; a search
is billed when it ran and succeeded. A failed search (time-out, provider error, bad arguments) is not billed:
the model reads the failure as the tool's output and answers or searches again. A round that fails before
its first output is not counted; a client that leaves mid-loop is billed for the rounds and searches done.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from k2ray.api.anthropic_protocol import AnthropicUsage, ServerToolUsage
from k2ray.api.openai_responses import CompletionTokensDetails, PromptTokensDetails, ServerToolUse, Usage
from k2ray.api.tool_call_parser import ToolCall
from k2ray.serve.engine.engine_protocol import EngineFailure, EngineRequest
from k2ray.serve.http.errors import ApiError
from k2ray.serve.http.generation import ChoiceDecoder, ChoiceEvent
from k2ray.serve.http.prompting import ChatJob
from k2ray.serve.http.router_context import RouterContext, StartedChoices, start_choices
from k2ray.serve.search.web_search_tools import SearchOutcome, SearchTool, over_limit, searched
from k2ray.tools import WebSearch

FORCED_TOOL_CHOICES = ("required", "named")


@dataclass(frozen=True)
class RoundPlan:
    request: EngineRequest
    decoder: ChoiceDecoder
    num_prompt_tokens: int


# (the round's conversation, its index, the output tokens the request has left) -> the round; None when
# the context has no room left for it (the response then finishes with `length`).
RoundBuilder = Callable[[ChatJob, int, int], RoundPlan | None]


class SearchLoop:
    """One request's rounds and searches; `start` is `dispatch`'s start hook."""

    def __init__(self, web_search: WebSearch, tool: SearchTool, job: ChatJob, first: RoundPlan,
                 build: RoundBuilder, max_tokens: int) -> None:
        self.tool = tool
        self._web_search = web_search
        self._job = job
        self._build = build
        self._max_tokens = max_tokens
        self.rounds: list[RoundPlan] = [first]  # every round whose engine request started
        self.num_searches = 0  # search runs, billed or not, against tool.max_searches
        self.num_billed_searches = 0
        self.is_done = False  # the current round is the last

    async def start(self, ctx: RouterContext, requests: list[EngineRequest],
                    decoders: list[ChoiceDecoder]) -> LoopChoices:
        return LoopChoices(self, ctx, await start_choices(ctx, requests, decoders))

    @property
    def decoder(self) -> ChoiceDecoder:
        return self.rounds[-1].decoder

    @property
    def is_finished(self) -> bool:
        return self.is_done and self.decoder.finished

    def tool_calls(self) -> list[ToolCall]:
        """The last round's calls the client must act on (search calls are the server's)."""
        return [c for c in self.decoder.tool_calls if c.name != self.tool.name]

    def search_calls(self, event: ChoiceEvent) -> list[ToolCall] | None:
        """The calls to run if this finishing round continues the loop, else None."""
        calls = self.decoder.tool_calls
        if event.finish_reason != "tool_calls" or not calls or any(c.name != self.tool.name for c in calls):
            return None
        return calls

    async def run(self, calls: list[ToolCall]) -> list[SearchOutcome]:
        """Runs the calls in order; counted as each one returns, so a cancelled search is not billed."""
        outcomes = []
        for call in calls:
            if self.num_searches >= self.tool.max_searches:
                outcomes.append(over_limit(call, self.tool.max_searches))
                continue
            self.num_searches += 1
            outcome = searched(call, await self._web_search.run_call(call.arguments), self._web_search.config)
            self.num_billed_searches += outcome.is_billed
            outcomes.append(outcome)
        return outcomes

    def next_round(self, outcomes: list[SearchOutcome]) -> RoundPlan | None:
        """The round after a search round: the conversation with its calls and results appended."""
        decoder = self.decoder
        assistant: dict[str, Any] = {"role": "assistant", "content": decoder.text, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in decoder.tool_calls]}
        if decoder.parser is not None and decoder.parser.reasoning_text:
            assistant["reasoning_content"] = decoder.parser.reasoning_text
        tools = self._job.tools
        if self.num_searches >= self.tool.max_searches and tools:
            tools = [t for t in tools if t["function"]["name"] != self.tool.name] or None
        choice = "auto" if self._job.tool_choice in FORCED_TOOL_CHOICES else self._job.tool_choice
        self._job = replace(self._job, messages=[*self._job.messages, assistant, *(o.tool_message() for o in outcomes)],
                            tools=tools, tool_choice=choice if tools else "none", forced_tool_name=None)
        num_left = self._max_tokens - sum(r.decoder.num_completion_tokens for r in self.rounds)
        return self._build(self._job, len(self.rounds), num_left) if num_left > 0 else None

    def _totals(self) -> tuple[int, int, int, int]:
        rounds = self.rounds
        return (sum(r.num_prompt_tokens for r in rounds), sum(r.decoder.num_cached_tokens for r in rounds),
                sum(r.decoder.num_completion_tokens for r in rounds),
                sum(r.decoder.num_reasoning_tokens for r in rounds))

    def openai_usage(self) -> Usage:
        prompt, cached, completion, reasoning = self._totals()
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     cached_tokens=cached, prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning),
                     server_tool_use=ServerToolUse(web_search_requests=self.num_billed_searches))

    def anthropic_usage(self) -> AnthropicUsage:
        prompt, cached, completion, _ = self._totals()
        return AnthropicUsage(input_tokens=prompt - cached, output_tokens=completion, cache_read_input_tokens=cached,
                              server_tool_use=ServerToolUsage(web_search_requests=self.num_billed_searches))

    @property
    def num_reasoning_tokens(self) -> int:
        return self._totals()[3]


class LoopChoices(StartedChoices):
    """The loop's choice (n is 1) as `dispatch` sees it: events of every round in order, with a
    `searches` event between rounds; closing it closes the round in flight (aborting its engine request)."""

    def __init__(self, loop: SearchLoop, ctx: RouterContext, first: StartedChoices) -> None:
        super().__init__(first.first, first.rest)
        self._loop = loop
        self._ctx = ctx
        self._current = first

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        loop = self._loop
        while True:
            calls = None
            search_indices: set[int] = set()
            async for event in self._current.events():
                if event.failure is not None:
                    self.has_failed = loop.is_done = True
                    yield event
                    return
                search_indices |= {d.index for d in event.tool_calls if d.name == loop.tool.name}
                event.tool_calls = [d for d in event.tool_calls if d.index not in search_indices]
                if event.finish_reason is not None:
                    calls = loop.search_calls(event)
                    loop.is_done = calls is None
                    event.finish_reason = event.finish_reason if calls is None else None
                yield event
            if calls is None:
                return
            outcomes = await loop.run(calls)
            yield ChoiceEvent(0, searches=outcomes)
            plan = loop.next_round(outcomes)
            if plan is None:
                loop.is_done = True
                yield ChoiceEvent(0, finish_reason="length")
                return
            failure = await self._start(plan)
            if failure is not None:
                self.has_failed = loop.is_done = True
                yield ChoiceEvent(0, failure=failure)
                return

    async def _start(self, plan: RoundPlan) -> EngineFailure | None:
        try:
            self._current = await start_choices(self._ctx, [plan.request], [plan.decoder])
        except ApiError as err:
            return EngineFailure("rejected" if err.status == 400 else "internal", err.message)
        self._loop.rounds.append(plan)
        return None

    async def aclose(self) -> None:
        await self._current.aclose()
