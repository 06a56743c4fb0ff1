"""Router side of the delta channel: one TCP listener per router replica, one connection per engine
replica that serves it, every request's deltas demultiplexed into that request's `DeltaBuffer`.

Streaming each request's deltas as its own Serve stream costs a message per request per engine step
at both ends; here an engine replica sends one frame per step with the deltas of all the requests
this router has on it. A connection that drops (engine replica gone) fails the unfinished requests
whose deltas it was carrying.

The listener is reachable by anything on the pod network, so a peer earns nothing before it proves the
router's token: its handshake is read with `sock_recv` of exactly `HANDSHAKE_SIZE` bytes (no stream
buffer, no frame length read) under a time-out, and at most `max_pending_connections` peers may be at
that stage. Past it, a request belongs to the one connection whose first row for it carried the
request's claim, a secret only the engine replica that Serve gave the request has seen: rows from any
other connection break the protocol and end that connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from dataclasses import dataclass, replace

from k2ray.serve.args import ChannelLimits
from k2ray.serve.channel.delta_wire import (
    HANDSHAKE_SIZE,
    WireError,
    decode_delta,
    is_handshake,
    is_secret,
    new_secret,
    read_frame,
)
from k2ray.serve.engine.engine_protocol import DeltaBuffer, EngineDelta, EngineFailure, ReplyAddress

logger = logging.getLogger(__name__)

CONNECTION_LOST = "lost the connection to the engine replica"
ACCEPT_RETRY_S = 0.1  # after a failed accept


@dataclass
class _Stream:
    buffer: DeltaBuffer
    claim: str
    connection_id: int | None = None  # the connection serving it, from its first row on


class DeltaReceiver:
    def __init__(self, host: str, limits: ChannelLimits | None = None) -> None:
        self._host = host
        self._limits = limits or ChannelLimits()
        self._token = new_secret()
        self._streams: dict[str, _Stream] = {}
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task | None = None
        self._connections: dict[int, asyncio.Task] = {}  # pending and authenticated
        self._connection_ids = itertools.count()
        self._num_pending = 0
        self._num_authenticated = 0
        self._address: ReplyAddress | None = None

    async def start(self) -> ReplyAddress:
        """The channel's address (no claim: `open` gives each request its own)."""
        if self._address is None:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET  # a pod IP may be IPv6
            self._listener = socket.create_server((self._host, 0), family=family)
            self._listener.setblocking(False)
            self._acceptor = asyncio.ensure_future(self._accept(self._listener))
            self._address = ReplyAddress(self._host, self._listener.getsockname()[1], self._token)
        return self._address

    async def stop(self) -> None:
        tasks = [task for task in (self._acceptor, *self._connections.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()

    def open(self, request_id: str) -> tuple[DeltaBuffer, ReplyAddress]:
        """The request's buffer, and the reply address (with the request's claim) to send it with."""
        if self._address is None:
            raise RuntimeError("start the receiver before opening requests on it")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        stream = self._streams[request_id] = _Stream(DeltaBuffer(), new_secret())
        return stream.buffer, replace(self._address, claim=stream.claim)

    def discard(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    @property
    def num_connections(self) -> int:
        """Authenticated connections (engine replicas streaming to this router)."""
        return self._num_authenticated

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, say: keep listening
                logger.warning("delta channel accept failed: %r", exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            if self._num_pending >= self._limits.max_pending_connections:
                sock.close()  # every handshake slot is taken: refused before anything is read
                continue
            sock.setblocking(False)
            self._num_pending += 1
            connection_id = next(self._connection_ids)
            task = self._connections[connection_id] = asyncio.ensure_future(self._serve(sock, connection_id))
            task.add_done_callback(lambda _, key=connection_id: self._connections.pop(key, None))

    async def _serve(self, sock: socket.socket, connection_id: int) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            try:
                is_peer = await asyncio.wait_for(self._handshake(sock), self._limits.handshake_timeout_s)
            finally:
                self._num_pending -= 1
            if not is_peer:
                return
            self._num_authenticated += 1
            try:
                reader, writer = await asyncio.open_connection(sock=sock)
                await self._read_frames(reader, connection_id)
            finally:
                self._num_authenticated -= 1
                self._fail_streams_of(connection_id)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
            pass  # silent past the time-out, or gone
        except WireError as exc:
            logger.warning("dropping delta channel connection %d: %s", connection_id, exc)
        finally:
            if writer is not None:
                writer.close()
            else:
                sock.close()

    async def _handshake(self, sock: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        hello = b""
        while len(hello) < HANDSHAKE_SIZE:
            chunk = await loop.sock_recv(sock, HANDSHAKE_SIZE - len(hello))
            if not chunk:
                return False
            hello += chunk
        return is_handshake(hello, self._token)

    async def _read_frames(self, reader: asyncio.StreamReader, connection_id: int) -> None:
        while True:
            rows = await read_frame(reader)
            if not isinstance(rows, list):
                raise WireError("a delta frame must be a list")
            for row in rows:
                self._dispatch(*decode_delta(row), connection_id)

    def _dispatch(self, request_id: str, delta: EngineDelta, claim: str | None, connection_id: int) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return  # the request already ended here (disconnect, stop string); its abort is on its way
        if stream.connection_id is None:
            if not is_secret(claim, stream.claim):
                raise WireError(f"first delta of {request_id!r:.80} without the request's claim")
            stream.connection_id = connection_id
        elif stream.connection_id != connection_id:
            raise WireError(f"delta for {request_id!r:.80}, which another connection serves")
        stream.buffer.put(delta)

    def _fail_streams_of(self, connection_id: int) -> None:
        for stream in self._streams.values():
            if stream.connection_id == connection_id:  # a finished buffer ignores the failure
                stream.buffer.put(EngineDelta(failure=EngineFailure("internal", CONNECTION_LOST)))
