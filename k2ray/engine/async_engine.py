from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from k2ray.engine.config import EngineConfig
from k2ray.engine.errors import EngineError, EngineStepError
from k2ray.engine.llm_engine import EngineStats, LLMEngine
from k2ray.engine.outputs import CompletionOutput, RequestOutput
from k2ray.engine.request import Request
from k2ray.engine.scheduler import RequestRejected
from k2ray.sampling_params import SamplingParams

__all__ = ["AsyncLLMEngine", "EngineError", "EngineStats", "RequestRejected"]

# How long the idle step loop sleeps before re-checking for shutdown.
IDLE_WAIT_S = 0.5


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event
    # Outputs (or the exception that ends the stream) not yet taken by the consumer.
    pending: list = field(default_factory=list)


class AsyncLLMEngine:
    """LLMEngine behind a background step-loop thread, for serving.

    `add_request` is an async generator of DELTA RequestOutputs (new tokens / text / logprobs
    since the previous yield; the last has finished=True). A consumer that keeps up gets one
    delta per engine step; one that lags gets everything that piled up merged into one delta,
    so per-item costs downstream shrink under load without adding latency. The engine itself is
    touched only by the loop thread: callers hand it commands through a queue, and each step's
    outputs come back in one `call_soon_threadsafe` per event loop, so the event loop never
    blocks on a step. A step that raises fails the requests it scheduled (EngineError, blocks freed) and the
    loop keeps going.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="k2ray-engine-loop", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          sampling_params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self._stopped:
            raise EngineError("the engine is shut down")
        request = self.engine.make_request(request_id, list(prompt_token_ids), sampling_params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Event())
        self._streams[request_id] = stream
        self._send(("add", request))
        finished = False
        try:
            while not finished:
                if not stream.pending:
                    stream.ready.clear()
                    await stream.ready.wait()
                    continue
                items, stream.pending = stream.pending, []
                merged = _merge_outputs(items)
                if merged is not None:
                    finished = merged.finished
                    yield merged
                if isinstance(items[-1], BaseException):
                    finished = True
                    raise items[-1]
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away: free the blocks now
                self._send(("abort", request_id, None))

    async def abort(self, request_id: str) -> None:
        """Finish the request (finish_reason "abort") and free its blocks before returning."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._send(("abort", request_id, lambda: loop.call_soon_threadsafe(_resolve, done)))
        if self._thread.is_alive():
            await done

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join()
        self._drain_inbox()
        self.engine.abort_requests(self.engine.scheduler.all_request_ids())
        self.engine.shutdown()
        for request_id in list(self._streams):
            self._deliver(request_id, EngineError("the engine is shut down"))

    def _send(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(IDLE_WAIT_S)
                self._wakeup.clear()
                continue
            self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineStepError as exc:
            # A rejection (a grammar that failed to compile) reaches the caller as such, with its reason.
            error = exc if isinstance(exc, RequestRejected) else EngineError(str(exc))
            for request_id in exc.request_ids:
                self._deliver(request_id, error)
            return
        except Exception as exc:  # not tied to a step's requests: fail them all, keep serving
            request_ids = list(self.engine.scheduler.requests)
            self.engine.abort_requests(request_ids)
            for request_id in request_ids:
                self._deliver(request_id, EngineError(f"engine failure: {exc!r}"))
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_fan_in, batch)
            except RuntimeError:  # the consumers' event loop is closed
                for _stream, output in batch:
                    self._drop(output.request_id)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(command[1])
            else:
                self._abort(command[1], command[2])

    def _add(self, request: Request) -> None:
        if request.request_id not in self._streams:
            return  # the consumer left before the request got here
        try:
            self.engine.add_prepared_request(request, stream=True)
        except Exception as exc:
            self._deliver(request.request_id, exc)

    def _abort(self, request_id: str, on_done: Callable[[], None] | None) -> None:
        for request in self.engine.abort_requests([request_id]):
            self._deliver(request_id, _aborted_output(request))
        if on_done is not None:
            on_done()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(_fan_in, [(stream, item)])
        except RuntimeError:  # the consumer's event loop is closed
            self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_requests([request_id])


def _fan_in(batch: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream.pending.append(item)
        stream.ready.set()


def _merge_outputs(items: list) -> RequestOutput | None:
    """The outputs in `items` (an exception can only come last) as one delta."""
    outputs = [item for item in items if not isinstance(item, BaseException)]
    if not outputs:
        return None
    merged = outputs[0]
    if len(outputs) == 1:
        return merged
    completion = merged.outputs[0]
    for later in outputs[1:]:
        step = later.outputs[0]
        completion.token_ids = completion.token_ids + step.token_ids
        completion.text += step.text
        if step.logprobs is not None:
            completion.logprobs = (completion.logprobs or []) + step.logprobs
        completion.cumulative_logprob = step.cumulative_logprob
        completion.finish_reason, completion.stop_reason = step.finish_reason, step.stop_reason
        merged.finished, merged.num_cached_tokens = later.finished, later.num_cached_tokens
    return merged


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _aborted_output(request: Request) -> RequestOutput:
    completion = CompletionOutput(0, "", [], None, None, finish_reason="abort")
    return RequestOutput(request.request_id, None, request.prompt_token_ids, [completion], True,
                         request.num_cached_tokens or 0)
