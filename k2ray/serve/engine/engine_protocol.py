"""What crosses the router -> engine-deployment boundary (Serve handle calls), as small dataclasses.

The router sends token ids and sampling params; the engine deployment streams back `EngineDelta`s
holding only token ids (the router owns the tokenizer). Engine-side failures travel as an
`EngineFailure` inside the last delta instead of an exception, so the router maps them to each API's
error shape without depending on how Ray wraps remote exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from k2ray.sampling_params import SamplingParams

if TYPE_CHECKING:  # the fenced test hooks: never imported by a production deployment
    from k2ray.serve.test_hooks import Injection


@dataclass(frozen=True)
class ReplyAddress:
    """Where an engine replica streams a request's deltas (the router replica's delta channel); the
    token is that router replica's secret, presented once per connection. `claim` is the request's own
    secret, sent with its first delta: it binds the request to the connection that serves it. It is not
    part of the address's identity (equality, hash): all of one router's requests share one connection."""

    host: str
    port: int
    token: str
    claim: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    injection: Injection | None = None  # test deployments only (`testing.allow_injection`)
    # None: deltas come back as the Serve call's own stream (`EngineServer.generate`).
    reply_to: ReplyAddress | None = None


@dataclass(frozen=True)
class EngineFailure:
    kind: Literal["rejected", "internal", "unavailable"]  # unavailable: no prefill replica could serve it
    message: str


@dataclass
class EngineDelta:
    """New tokens since the previous delta (several engine steps may be merged into one)."""

    token_ids: list[int] = field(default_factory=list)
    # Per new token: {token_id: logprob} for the sampled token plus the top-N alternatives.
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0
    finish_reason: Literal["stop", "length", "abort"] | None = None
    failure: EngineFailure | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.failure is not None

    def merge(self, later: EngineDelta) -> None:
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, later.num_cached_tokens)
        self.finish_reason = later.finish_reason or self.finish_reason
        self.failure = later.failure or self.failure


class DeltaBuffer:
    """Deltas produced faster than they are consumed, merged into one on `take`."""

    def __init__(self) -> None:
        self._pending: list[EngineDelta] = []
        self._ready = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None
        self.finished = False  # a final delta was put

    def put(self, delta: EngineDelta) -> None:
        if self.finished:
            return  # nothing follows a final delta (a late failure from a watchdog, say)
        self.finished = delta.finished
        self._pending.append(delta)
        self._ready.set()

    def close(self, error: BaseException | None = None) -> None:
        """No more deltas; `take` raises `error` (if given) once the pending ones are drained."""
        self._closed = True
        self._error = self._error or error
        self._ready.set()

    async def take(self, min_tokens: int = 1) -> EngineDelta | None:
        """The merge of everything pending once it holds `min_tokens` tokens (or is final), or None
        once closed and drained."""
        while not self._is_ready(min_tokens):
            if self._closed:
                break
            self._ready.clear()
            await self._ready.wait()
        if not self._pending:
            if self._error is not None:
                raise self._error
            return None
        merged, *rest = self._pending
        for delta in rest:
            merged.merge(delta)
        self._pending = []
        return merged

    def _is_ready(self, min_tokens: int) -> bool:
        if not self._pending:
            return False
        return self._pending[-1].finished or sum(len(d.token_ids) for d in self._pending) >= min_tokens


class EngineOverloaded(Exception):
    """No engine replica can take the request now (Serve's queue in front of the engines is full)."""


class EngineClient(Protocol):
    """How the router talks to an engine pool; a Serve handle in production, a fake in unit tests.

    Closing the returned iterator early (client disconnect, stop string) must abort the engine request.
    """

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]: ...
