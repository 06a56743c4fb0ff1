"""The engine replica's handle on its engine core process (see engine_core.py).

Starts the process and waits until the model is loaded (within a time-out); afterwards every call is
asynchronous: messages to the core are written by a thread of their own (a request larger than the
socket buffer never blocks the replica's event loop), and the replies come in on that loop through a
reader on the socket pair. If the core dies, everything waiting on it fails and `is_alive` turns false
(the replica's health check reports it).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from k2ray.serve.engine.engine_core_protocol import (
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
from k2ray.serve.engine.engine_protocol import (
    DeltaBuffer,
    EngineDelta,
    EngineFailure,
    EngineRequest,
    ReplyAddress,
)

# How long shutdown waits for the core to exit before killing it.
SHUTDOWN_TIMEOUT_S = 10.0
# While waiting for the core to start, how often to check that it is still running.
STARTUP_POLL_S = 0.1
CORE_COMMAND = (sys.executable, "-m", "k2ray.serve.engine.engine_core")  # + the fd of the core's socket end
CORE_LOST = "the engine core process exited"


class EngineCoreDied(RuntimeError):
    pass


class Outbox:
    """Messages to the core, pickled and written in order by a thread of their own."""

    def __init__(self, conn: Connection) -> None:
        self._queue: queue.SimpleQueue[object | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, args=(conn,), name="engine-core-outbox", daemon=True)
        self._thread.start()

    def put(self, message: object) -> None:
        self._queue.put(message)

    def close(self, timeout_s: float) -> None:
        """Write what is queued, then stop (a core that is gone fails the writes and ends it too)."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _write(self, conn: Connection) -> None:
        # A failed write means the core is gone; the replica's reader hears its end of the socket close
        # and fails everything waiting on it.
        try:
            while (message := self._queue.get()) is not None:
                conn.send(message)
        except OSError:
            pass


class EngineCoreClient:
    def __init__(self, config: CoreConfig, startup_timeout_s: float,
                 core_command: Sequence[str] = CORE_COMMAND) -> None:
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen([*core_command, str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(config)
            ready = self._wait_ready(startup_timeout_s)
        except BaseException:
            self._kill()
            self._conn.close()
            raise
        self.max_model_len = ready.max_model_len
        self.block_size = ready.block_size
        self._core_id = None if config.pd is None else config.pd.core_id
        self._outbox = Outbox(self._conn)
        self._finished: dict[str, asyncio.Future[None]] = {}
        self._streams: dict[str, DeltaBuffer] = {}
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._ack_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: str | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def pids(self) -> list[int]:
        """Every process of this engine (one core; an EP group has one per rank)."""
        return [self._process.pid]

    def core_id_of(self, request_id: str) -> str | None:
        """The P/D core id of the core that runs `request_id`: this one's (None without P/D)."""
        return self._core_id

    @property
    def is_alive(self) -> bool:
        if self._error is None and self._process.poll() is not None:
            self._lost()  # died between messages: nothing read EOF yet
        return self._error is None

    async def run_on_channel(self, request: EngineRequest) -> None:
        """Start the request, its deltas going to `request.reply_to`; return when it is over there."""
        done = self.track(request.request_id)
        self._send(core_add(request, request.reply_to))
        await done

    def track(self, request_id: str) -> asyncio.Future[None]:
        """A future done once the core reports the channel request over (started by another message)."""
        done = self._finished[request_id] = self._loop_future()
        return done

    def stream(self, request: EngineRequest) -> DeltaBuffer:
        """Start the request, its deltas coming back here."""
        self._ensure_reader()
        self._send(core_add(request, None))
        buffer = self._streams[request.request_id] = DeltaBuffer()
        return buffer

    def forget(self, request_id: str) -> None:
        self._finished.pop(request_id, None)
        self._streams.pop(request_id, None)

    async def abort(self, request_id: str, failure: EngineFailure | None = None) -> None:
        """Abort (ending it with `failure`, if given) and wait until the core has freed its blocks."""
        await self.ask(lambda ack_id: CoreAbort(request_id, ack_id, failure))

    async def stats(self) -> dict[str, int]:
        return await self.ask(CoreStatsQuery)

    def shutdown(self) -> None:
        if self._conn.closed:
            return
        if self._process.poll() is None:
            self._outbox.put(CoreShutdown())
            try:
                self._process.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill()
        self._outbox.close(SHUTDOWN_TIMEOUT_S)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._conn.close()

    def _wait_ready(self, timeout_s: float) -> CoreReady:
        """The core's first message, once it has loaded the model (this blocks, as building an
        in-process engine would); EngineCoreDied if it fails, exits or does not answer in time."""
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(STARTUP_POLL_S):
            if (returncode := self._process.poll()) is not None:
                raise EngineCoreDied(f"the engine core exited with code {returncode} before it was ready")
            if time.monotonic() >= deadline:
                raise EngineCoreDied(f"the engine core did not answer within {timeout_s:g} s of starting")
        try:
            ready = self._conn.recv()
        except (EOFError, OSError):
            raise EngineCoreDied("the engine core exited before it was ready") from None
        if isinstance(ready, CoreFailed):
            raise EngineCoreDied(ready.message)
        if not isinstance(ready, CoreReady):
            raise EngineCoreDied(f"the engine core answered {type(ready).__name__} instead of CoreReady")
        return ready

    def _kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()

    async def ask(self, make_message: Callable[[int], object]) -> Any:
        """Send the message `make_message(ack_id)` makes and return the payload of its ack."""
        ack_id = next(self._ack_ids)
        reply = self._loop_future()
        self._send(make_message(ack_id))
        self._acks[ack_id] = reply
        return await reply

    def _loop_future(self) -> asyncio.Future:
        self._ensure_reader()
        return self._loop.create_future()

    def _send(self, message: object) -> None:
        """Queue the message for the core; never blocks the event loop. Callers register what waits on
        the answer right after, before they yield: replies (and `_lost`) are handled on this loop too."""
        if self._error is not None or not self.is_alive:
            raise EngineCoreDied(self._error)
        self._outbox.put(message)

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


def core_add(request: EngineRequest, reply_to: ReplyAddress | None) -> CoreAdd:
    return CoreAdd(request.request_id, request.prompt_token_ids, request.sampling_params, reply_to,
                   request.injection)
