"""Router side of the delta channel: one TCP listener per router replica, one connection per engine
replica that serves it, every request's deltas demultiplexed into that request's `DeltaBuffer`.

Streaming each request's deltas as its own Serve stream costs a message per request per engine step
at both ends; here an engine replica sends one frame per step with the deltas of all the requests
this router has on it. A connection that drops (engine replica gone) fails the unfinished requests
whose deltas it was carrying.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets

from k2ray.serve.delta_wire import WireError, decode_delta, read_frame
from k2ray.serve.engine_protocol import DeltaBuffer, EngineDelta, EngineFailure, ReplyAddress

logger = logging.getLogger(__name__)

# How long an engine replica may take to present the token once connected.
HANDSHAKE_TIMEOUT_S = 10.0
TOKEN_BYTES = 16
CONNECTION_LOST = "lost the connection to the engine replica"


class DeltaReceiver:
    def __init__(self, host: str) -> None:
        self._host = host
        self._token = secrets.token_hex(TOKEN_BYTES)
        self._buffers: dict[str, DeltaBuffer] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._address: ReplyAddress | None = None

    async def start(self) -> ReplyAddress:
        if self._address is None:
            self._server = await asyncio.start_server(self._serve_connection, self._host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self._address = ReplyAddress(self._host, port, self._token)
        return self._address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):  # a closed server keeps its connections open
                writer.close()
            await self._server.wait_closed()

    def open(self, request_id: str) -> DeltaBuffer:
        if request_id in self._buffers:
            raise ValueError(f"request id {request_id!r} is already streaming")
        buffer = self._buffers[request_id] = DeltaBuffer()
        return buffer

    def discard(self, request_id: str) -> None:
        self._buffers.pop(request_id, None)

    @property
    def num_connections(self) -> int:
        return len(self._connections)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        carried: set[str] = set()  # unfinished requests whose deltas came over this connection
        self._connections.add(writer)
        try:
            if not await self._accept(reader):
                return
            while True:
                rows = await read_frame(reader)
                if not isinstance(rows, list):
                    raise WireError("a delta frame must be a list")
                for row in rows:
                    self._dispatch(*decode_delta(row), carried)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except WireError:
            logger.exception("dropping an engine connection that sent a bad frame")
        finally:
            self._connections.discard(writer)
            writer.close()
            for request_id in carried:
                if (buffer := self._buffers.get(request_id)) is not None:
                    buffer.put(EngineDelta(failure=EngineFailure("internal", CONNECTION_LOST)))

    async def _accept(self, reader: asyncio.StreamReader) -> bool:
        try:
            hello = await asyncio.wait_for(read_frame(reader), HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, WireError):
            return False
        token = hello.get("token") if isinstance(hello, dict) else None
        return isinstance(token, str) and hmac.compare_digest(token, self._token)

    def _dispatch(self, request_id: str, delta: EngineDelta, carried: set[str]) -> None:
        buffer = self._buffers.get(request_id)
        if buffer is None:
            return  # the request already ended here (disconnect, stop string); its abort is on its way
        if delta.finished:
            carried.discard(request_id)
        else:
            carried.add(request_id)
        buffer.put(delta)
