"""Engine side of the delta channel: one connection per router replica (keyed by its `ReplyAddress`),
deltas batched into one frame per event-loop turn.

All the requests an engine step advanced wake in the same loop turn and each `send` its delta; the
link's writer task runs on the next turn and writes them as a single frame, so the per-token cost of
streaming is a list append instead of a message.
"""

from __future__ import annotations

import asyncio
import contextlib

from k2ray.serve.delta_wire import encode_delta, encode_frame
from k2ray.serve.engine_protocol import EngineDelta, ReplyAddress

CONNECT_TIMEOUT_S = 10.0


class LinkBroken(ConnectionError):
    """The router replica behind this link went away; its requests cannot be delivered."""


class DeltaLink:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[list] = []
        self._wake = asyncio.Event()
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._write_loop())

    @property
    def is_broken(self) -> bool:
        return self._error is not None

    def send(self, request_id: str, delta: EngineDelta) -> None:
        self.send_rows([encode_delta(request_id, delta)])

    def send_rows(self, rows: list[list]) -> None:
        """Queue encoded delta rows for the next frame (event loop thread only)."""
        if self._error is not None:
            raise LinkBroken(str(self._error))
        self._pending.extend(rows)
        self._wake.set()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                rows, self._pending = self._pending, []
                self._writer.write(encode_frame(rows))
                await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._error = exc


class DeltaSender:
    """The engine replica's links to router replicas, opened on first use and replaced when broken."""

    def __init__(self) -> None:
        self._links: dict[ReplyAddress, DeltaLink] = {}
        self._connecting: dict[ReplyAddress, asyncio.Lock] = {}

    async def link(self, address: ReplyAddress) -> DeltaLink:
        link = self._links.get(address)
        if link is not None and not link.is_broken:
            return link
        async with self._connecting.setdefault(address, asyncio.Lock()):
            link = self._links.get(address)
            if link is None or link.is_broken:
                if link is not None:
                    await link.close()
                link = self._links[address] = await self._connect(address)
            return link

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()
        self._links.clear()

    @staticmethod
    async def _connect(address: ReplyAddress) -> DeltaLink:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port),
                                               CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise LinkBroken(f"cannot reach the router at {address.host}:{address.port}: {exc}") from None
        writer.write(encode_frame({"token": address.token}))
        return DeltaLink(writer)
