"""Engine outputs straight from the engine step onto a router's delta link.

`ChannelSink` is the `OutputSink` of every request one router replica has on this engine replica. The
engine thread puts each step's outputs (turned into wire rows right there, `stream_interval` applied),
then flushes once: a single `call_soon_threadsafe` hands the step's rows to the event loop, which
writes them as one frame and resolves the Serve calls of the requests that finished. No per-request
task wakes per token, so the event loop (which shares the GIL with the engine thread) stays nearly idle.
"""

from __future__ import annotations

import asyncio
import logging

from k2ray.engine.outputs import RequestOutput
from k2ray.engine.scheduler import RequestRejected
from k2ray.serve.delta_sender import DeltaLink, LinkBroken
from k2ray.serve.delta_wire import encode_delta
from k2ray.serve.engine_protocol import EngineDelta, EngineFailure

logger = logging.getLogger(__name__)

ENGINE_FAILURE = "engine failure"


def to_delta(out: RequestOutput) -> EngineDelta:
    completion = out.outputs[0]
    logprobs = None
    if completion.logprobs is not None:
        logprobs = [{tid: lp.logprob for tid, lp in step.items()} for step in completion.logprobs]
    finish = completion.finish_reason if out.finished else None
    if out.finished and finish not in ("stop", "length", "abort"):
        finish = "stop"
    return EngineDelta(list(completion.token_ids), logprobs, out.num_cached_tokens, finish)


def failure_of(error: BaseException) -> EngineFailure:
    if isinstance(error, RequestRejected):
        return EngineFailure("rejected", str(error))
    return EngineFailure("internal", ENGINE_FAILURE)  # details stay in the engine's log


class ChannelSink:
    def __init__(self, link: DeltaLink, stream_interval: int) -> None:
        self.link = link
        self._loop = asyncio.get_running_loop()
        self._stream_interval = stream_interval
        # Engine thread only: rows and finished ids since the last flush, and per running request the
        # tokens sent so far and a delta held back until it reaches `stream_interval` tokens.
        self._rows: list[list] = []
        self._finished_ids: list[str] = []
        self._num_sent: dict[str, int] = {}
        self._held: dict[str, EngineDelta] = {}
        # Event loop only: the Serve call of each request, resolved once its final row is written.
        self._waiters: dict[str, asyncio.Future[None]] = {}

    def expect(self, request_id: str) -> asyncio.Future[None]:
        """A future that resolves once the request's final delta is on the wire (raises LinkBroken if
        the router can no longer be reached)."""
        waiter = self._waiters[request_id] = self._loop.create_future()
        return waiter

    def forget(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    # -- engine thread ---------------------------------------------------------------------------------
    def put(self, output: RequestOutput) -> None:
        request_id = output.request_id
        delta = to_delta(output)
        if (held := self._held.pop(request_id, None)) is not None:
            held.merge(delta)
            delta = held
        num_sent = self._num_sent.get(request_id, 0)
        if not delta.finished and num_sent and len(delta.token_ids) < self._stream_interval:
            self._held[request_id] = delta
            return
        self._emit(request_id, delta)
        if not delta.finished:
            self._num_sent[request_id] = num_sent + len(delta.token_ids)

    def fail(self, request_id: str, error: BaseException) -> None:
        if not isinstance(error, RequestRejected):
            logger.error("engine failure on request %s: %r", request_id, error)
        self._held.pop(request_id, None)
        self._emit(request_id, EngineDelta(failure=failure_of(error)))

    def flush(self) -> None:
        if not self._rows:
            return
        rows, finished_ids = self._rows, self._finished_ids
        self._rows, self._finished_ids = [], []
        try:
            self._loop.call_soon_threadsafe(self._write, rows, finished_ids)
        except RuntimeError:  # the event loop is closed: the replica is going away with its requests
            pass

    def _emit(self, request_id: str, delta: EngineDelta) -> None:
        self._rows.append(encode_delta(request_id, delta))
        if delta.finished:
            self._num_sent.pop(request_id, None)
            self._finished_ids.append(request_id)

    # -- event loop ------------------------------------------------------------------------------------
    def _write(self, rows: list[list], finished_ids: list[str]) -> None:
        try:
            self.link.send_rows(rows)
        except LinkBroken as exc:
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(exc)
            self._waiters.clear()
            return
        for request_id in finished_ids:
            waiter = self._waiters.pop(request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
