"""Token ids from the engine -> parsed per-choice events (text, reasoning, tool calls, finish).

The router owns detokenization, so stop strings are applied here, on the generated text with special
tokens rendered (what the parser sees): text that could still grow into a stop string is held back,
and on a match the choice finishes with `stop` and its engine request is aborted (the engine stream is
closed, which cancels the Serve call and makes the engine deployment abort the request).

Text hygiene: a chat choice's parser sees K2's marker tokens (it consumes them); every other special
or reserved token (`<|reserved_token_N|>`, `<|media_content|>`, ...) is dropped before detokenizing,
as vLLM's skip_special_tokens does, so none reaches content, reasoning or arguments.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from k2ray.api.detokenizer import IncrementalDetokenizer
from k2ray.api.output_parser import ALL_MARKERS, K2OutputParser, OutputDelta, ToolCall, ToolCallDelta
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.serve.engine.engine_protocol import EngineClient, EngineDelta, EngineFailure, EngineRequest
from k2ray.serve.metrics.router_metrics import ERROR_FINISH, ChoiceTimer

if TYPE_CHECKING:
    from k2ray.serve.search.web_search_tools import SearchOutcome

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass
class ChoiceEvent:
    """What one engine delta (or the prompt prefill) turned into for one choice."""

    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # (sampled token id, {token id: logprob}) per generated token, only when logprobs were asked for.
    logprobs: list[tuple[int, dict[int, float]]] = field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    failure: EngineFailure | None = None
    searches: list[SearchOutcome] = field(default_factory=list)  # server-side searches run after this round

    def add(self, out: OutputDelta) -> None:
        self.reasoning += out.reasoning_content
        self.content += out.content
        self.tool_calls.extend(out.tool_calls)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.failure is not None


class StopStringMatcher:
    """Finds the first stop string in a text stream, holding back a tail that could still match."""

    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self._stops = stops
        self._include_stop = include_stop
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        self._pending += text
        hits = [(pos, s) for s in self._stops if (pos := self._pending.find(s)) >= 0]
        if hits:
            pos, stop = min(hits)
            released = self._pending[: pos + len(stop) if self._include_stop else pos]
            self._pending = ""
            return released, stop
        cut = max(len(self._pending) - self._hold, 0)
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released, None

    def flush(self) -> str:
        released, self._pending = self._pending, ""
        return released


class ChoiceDecoder:
    """Per-choice state: detokenizer, stop strings, K2 output parser (None for raw completions)
    and the token counters that usage reports."""

    def __init__(self, index: int, tokenizer: K2Tokenizer, parser: K2OutputParser | None,
                 stop: list[str], include_stop: bool, want_logprobs: bool) -> None:
        self.index = index
        self.parser = parser
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=parser is None)
        self._stop_token_ids = frozenset(tokenizer.stop_token_ids)
        self._tokenizer = tokenizer
        self._marker_ids = frozenset(tokenizer.special_token_ids[m] for m in ALL_MARKERS
                                     if m in tokenizer.special_token_ids)
        self._matcher = StopStringMatcher(stop, include_stop) if stop else None
        self._want_logprobs = want_logprobs
        self.num_completion_tokens = 0
        self.num_reasoning_tokens = 0
        self.num_cached_tokens = 0
        self.finished = False
        self.text = ""  # content as delivered (raw completions and Anthropic text blocks use it)
        self._max_tool_calls: int | None = None

    def limit_tool_calls(self, max_calls: int | None) -> None:
        """Finish with `tool_calls` as soon as `max_calls` calls are complete (None: no limit); the rest
        of the output is cut, so the engine request is aborted as on a stop string."""
        self._max_tool_calls = max_calls

    def feed(self, delta: EngineDelta) -> ChoiceEvent:
        event = ChoiceEvent(self.index, num_cached_tokens=delta.num_cached_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        self.num_completion_tokens += len(delta.token_ids)
        if self._want_logprobs and delta.logprobs is not None:
            event.logprobs.extend(zip(delta.token_ids, delta.logprobs, strict=True))
        # Turn-ending tokens are counted but never shown; nor is any special token the parser does not read.
        shown = [t for t in delta.token_ids if t not in self._stop_token_ids and self._is_shown(t)]
        # Raw completions detokenize a whole delta at once; chat feeds the parser token by token so
        # that reasoning tokens can be counted.
        pieces = [shown] if self.parser is None else [[t] for t in shown]
        for piece in pieces:
            stop = self._route(self._detok.push(piece), event, is_token=True)
            if stop is not None:
                self._finish(event, "stop", stop)
                return event
            if self._is_tool_call_limit_reached():
                self._finish(event, "tool_calls", None)
                return event
        if delta.failure is not None:
            event.failure = delta.failure
            self.finished = True
        elif delta.finish_reason == "abort":
            event.failure = EngineFailure("internal", "the engine aborted the request")
            self.finished = True
        elif delta.finish_reason is not None:
            self._route(self._detok.flush(), event)
            self._finish(event, "length" if delta.finish_reason == "length" else "stop", None)
        return event

    def _is_shown(self, token_id: int) -> bool:
        return not self._tokenizer.is_special(token_id) or (self.parser is not None and token_id in self._marker_ids)

    def fail(self, failure: EngineFailure) -> ChoiceEvent:
        self.finished = True
        return ChoiceEvent(self.index, failure=failure)

    def _route(self, text: str, event: ChoiceEvent, is_token: bool = False) -> str | None:
        stop = None
        if self._matcher is not None:
            text, stop = self._matcher.push(text)
        if self.parser is None:
            event.content += text
            self.text += text
            return stop
        was_reasoning = self.parser.is_reasoning
        out = self.parser.feed(text)
        if is_token and (was_reasoning or self.parser.is_reasoning):
            self.num_reasoning_tokens += 1
        event.add(out)
        self.text += out.content
        return stop

    def _finish(self, event: ChoiceEvent, reason: FinishReason, stop: str | None) -> None:
        if self._matcher is not None and stop is None:
            tail = self._matcher.flush()
            if self.parser is None:
                event.content += tail
                self.text += tail
            else:
                out = self.parser.feed(tail)
                event.add(out)
                self.text += out.content
        if self.parser is not None:
            out = self.parser.finish()
            event.add(out)
            self.text += out.content
            if reason == "stop" and self.parser.tool_calls:
                reason = "tool_calls"
        if self._max_tool_calls is not None:  # a call begun in the same text as the cut one is dropped
            event.tool_calls = [d for d in event.tool_calls if d.index < self._max_tool_calls]
        event.finish_reason = reason
        event.stop_sequence = stop
        self.finished = True

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.parser.tool_calls[: self._max_tool_calls] if self.parser is not None else []

    def _is_tool_call_limit_reached(self) -> bool:
        return (self._max_tool_calls is not None and self.parser is not None
                and len(self.parser.tool_calls) >= self._max_tool_calls)


async def run_choice(client: EngineClient, request: EngineRequest, decoder: ChoiceDecoder,
                     timer: ChoiceTimer | None = None) -> AsyncIterator[ChoiceEvent]:
    """One engine request through its decoder (timed by `timer`, if any); closing early (stop string,
    disconnect) aborts it."""
    stream = client.generate(request)
    try:
        async for delta in stream:
            event = decoder.feed(delta)
            if timer is not None:
                timer.on_tokens(len(delta.token_ids))
                if event.finished:
                    timer.on_finish(ERROR_FINISH if event.failure is not None else str(event.finish_reason))
            yield event
            if decoder.finished:
                return
        if not decoder.finished:
            if timer is not None:
                timer.on_finish(ERROR_FINISH)
            yield decoder.fail(EngineFailure("internal", "the engine stream ended early"))
    finally:
        await stream.aclose()


async def merge_choices(streams: list[AsyncIterator[ChoiceEvent]]) -> AsyncIterator[ChoiceEvent]:
    """Interleave the events of n choices as they arrive; cancelling the merge cancels them all."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield event
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[ChoiceEvent]) -> None:
        try:
            async for event in stream:
                await queue.put(event)
        except Exception as exc:  # re-raised in the consumer
            await queue.put(exc)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
