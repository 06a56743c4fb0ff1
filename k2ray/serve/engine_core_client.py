"""The engine replica's handle on its engine core process (see engine_core.py).

Starts the process and waits until the model is loaded; afterwards every call is asynchronous: the
replies come in on the replica's event loop through a reader on the socket pair. If the core dies,
everything waiting on it fails and `is_alive` turns false (the replica's health check reports it).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection

from k2ray.serve.engine_core_protocol import (
    CoreAbort,
    CoreAck,
    CoreAdd,
    CoreConfig,
    CoreDeltas,
    CoreFailed,
    CoreFinished,
    CoreReady,
    CoreShutdown,
    CoreStatsQuery,
)
from k2ray.serve.engine_protocol import DeltaBuffer, EngineDelta, EngineFailure, EngineRequest

# How long shutdown waits for the core to exit before killing it.
SHUTDOWN_TIMEOUT_S = 10.0
CORE_LOST = "the engine core process exited"


class EngineCoreDied(RuntimeError):
    pass


class EngineCoreClient:
    def __init__(self, config: CoreConfig) -> None:
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen([sys.executable, "-m", "k2ray.serve.engine_core", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(config)
        ready = self._conn.recv()  # blocks while the core loads the model, like an in-process engine would
        if isinstance(ready, CoreFailed):
            self._process.wait()
            raise EngineCoreDied(ready.message)
        assert isinstance(ready, CoreReady), ready
        self.max_model_len = ready.max_model_len
        self._finished: dict[str, asyncio.Future[None]] = {}
        self._streams: dict[str, DeltaBuffer] = {}
        self._acks: dict[int, asyncio.Future[dict[str, int] | None]] = {}
        self._ack_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: str | None = None

    @property
    def is_alive(self) -> bool:
        if self._error is None and self._process.poll() is not None:
            self._lost()  # died between messages: nothing read EOF yet
        return self._error is None

    async def run_on_channel(self, request: EngineRequest) -> None:
        """Start the request, its deltas going to `request.reply_to`; return when it is over there."""
        done = self._loop_future()
        self._finished[request.request_id] = done
        self._send(CoreAdd(request.request_id, request.prompt_token_ids, request.sampling_params, request.reply_to))
        await done

    def stream(self, request: EngineRequest) -> DeltaBuffer:
        """Start the request, its deltas coming back here."""
        self._ensure_reader()
        buffer = self._streams[request.request_id] = DeltaBuffer()
        self._send(CoreAdd(request.request_id, request.prompt_token_ids, request.sampling_params, None))
        return buffer

    def forget(self, request_id: str) -> None:
        self._finished.pop(request_id, None)
        self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Abort and wait until the core has freed the request's blocks."""
        await self._ask(lambda ack_id: CoreAbort(request_id, ack_id))

    async def stats(self) -> dict[str, int]:
        return await self._ask(CoreStatsQuery)

    def shutdown(self) -> None:
        if self._process.poll() is None:
            try:
                self._conn.send(CoreShutdown())
                self._process.wait(SHUTDOWN_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._conn.close()

    async def _ask(self, make_message: Callable[[int], object]) -> dict[str, int] | None:
        ack_id = next(self._ack_ids)
        reply = self._acks[ack_id] = self._loop_future()
        self._send(make_message(ack_id))
        return await reply

    def _loop_future(self) -> asyncio.Future:
        self._ensure_reader()
        return self._loop.create_future()

    def _send(self, message: object) -> None:
        if self._error is not None:
            raise EngineCoreDied(self._error)
        try:
            self._conn.send(message)
        except OSError:
            self._lost()
            raise EngineCoreDied(CORE_LOST) from None

    def _ensure_reader(self) -> None:
        # A replica runs one event loop for its lifetime; follow a new one anyway (an owner that runs
        # one loop per call, like a test harness).
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
            self._loop = loop
            loop.add_reader(self._conn.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._lost()

    def _dispatch(self, message: object) -> None:
        if isinstance(message, CoreDeltas):
            for request_id, delta in message.deltas:
                if (buffer := self._streams.get(request_id)) is not None:
                    buffer.put(delta)
                    if delta.finished:
                        del self._streams[request_id]
        elif isinstance(message, CoreFinished):
            for request_id in message.request_ids:
                if (done := self._finished.pop(request_id, None)) is not None and not done.done():
                    done.set_result(None)
        elif isinstance(message, CoreAck):
            if (reply := self._acks.pop(message.ack_id, None)) is not None and not reply.done():
                reply.set_result(message.payload)
        elif isinstance(message, CoreFailed):
            self._lost(message.message)

    def _lost(self, message: str = CORE_LOST) -> None:
        """Fail everything waiting on the core."""
        if self._error is not None:
            return
        self._error = message
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        for waiter in [*self._finished.values(), *self._acks.values()]:
            if not waiter.done():
                waiter.set_exception(EngineCoreDied(message))
        for buffer in self._streams.values():
            buffer.put(EngineDelta(failure=EngineFailure("internal", message)))
        self._finished.clear()
        self._acks.clear()
        self._streams.clear()
