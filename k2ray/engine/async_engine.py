from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from k2ray.engine.config import EngineConfig
from k2ray.engine.llm_engine import EngineError, EngineStats, EngineStepError, LLMEngine
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
    queue: asyncio.Queue


class AsyncLLMEngine:
    """LLMEngine behind a background step-loop thread, for serving.

    `add_request` is an async generator of DELTA RequestOutputs (new tokens / text / logprobs
    since the previous yield; the last has finished=True). The engine itself is touched only by
    the loop thread: callers hand it commands through a queue, and outputs come back through
    `call_soon_threadsafe` onto per-request asyncio queues, so the event loop never blocks on a
    step. A step that raises fails the requests it scheduled (EngineError, blocks freed) and the
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
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._send(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
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
        pending = list(self.engine.scheduler.requests)
        self.engine.abort_requests(pending)
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
            for request_id in exc.request_ids:
                self._deliver(request_id, EngineError(str(exc)))
            return
        except Exception as exc:  # not tied to a step's requests: fail them all, keep serving
            request_ids = list(self.engine.scheduler.requests)
            self.engine.abort_requests(request_ids)
            for request_id in request_ids:
                self._deliver(request_id, EngineError(f"engine failure: {exc!r}"))
            return
        for output in outputs:
            self._deliver(output.request_id, output)

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
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed
            self._streams.pop(request_id, None)
            self.engine.abort_requests([request_id])


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _aborted_output(request: Request) -> RequestOutput:
    completion = CompletionOutput(0, "", [], None, None, finish_reason="abort")
    return RequestOutput(request.request_id, None, request.prompt_token_ids, [completion], True,
                         request.num_cached_tokens or 0)
