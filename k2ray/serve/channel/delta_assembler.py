"""Engine outputs -> EngineDeltas, with `stream_interval` applied per request.

Runs next to the engine's step loop (in the engine core process): each step's RequestOutputs become
at most one delta per request; after the first delta (TTFT), a request's tokens are held back until
they reach `stream_interval` or the request finishes.
"""

from __future__ import annotations

from k2ray.engine.outputs import RequestOutput
from k2ray.engine.scheduler import RequestRejected
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure

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


class DeltaAssembler:
    def __init__(self, stream_interval: int) -> None:
        self._stream_interval = stream_interval
        self._num_sent: dict[str, int] = {}
        self._held: dict[str, EngineDelta] = {}

    def add(self, output: RequestOutput) -> EngineDelta | None:
        """The delta to send now for this output, or None while it is held back."""
        request_id = output.request_id
        delta = to_delta(output)
        if (held := self._held.pop(request_id, None)) is not None:
            held.merge(delta)
            delta = held
        num_sent = self._num_sent.get(request_id, 0)
        if not delta.finished and num_sent and len(delta.token_ids) < self._stream_interval:
            self._held[request_id] = delta
            return None
        if delta.finished:
            self._num_sent.pop(request_id, None)
        else:
            self._num_sent[request_id] = num_sent + len(delta.token_ids)
        return delta

    @property
    def num_requests(self) -> int:
        """Requests this assembler holds state for (unfinished ones that have streamed)."""
        return len(self._num_sent.keys() | self._held.keys())

    def forget(self, request_id: str) -> None:
        """Drop the request's state without a final delta (its router is gone)."""
        self._num_sent.pop(request_id, None)
        self._held.pop(request_id, None)

    def abort(self, request_id: str) -> EngineDelta:
        """The final delta of an aborted request (with any tokens still held back)."""
        self._num_sent.pop(request_id, None)
        delta = self._held.pop(request_id, None) or EngineDelta()
        delta.finish_reason = "abort"
        return delta

    def fail(self, request_id: str, error: BaseException) -> EngineDelta:
        self.forget(request_id)
        return EngineDelta(failure=failure_of(error))
