"""The engine core's connections to router replicas' delta channels: one blocking socket per router.

The core's step loop writes each step's frame itself (no event loop, no other thread): a send blocks
only while the router's socket buffer is full, and a router that cannot take a frame within
`SEND_TIMEOUT_S` is treated as gone. A connection opens with the fixed-size handshake (delta_wire.py).
"""

from __future__ import annotations

import socket

from k2ray.serve.channel.delta_wire import encode_frame, encode_handshake
from k2ray.serve.engine.engine_protocol import ReplyAddress

CONNECT_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 5.0


class SocketLinks:
    def __init__(self) -> None:
        self._sockets: dict[ReplyAddress, socket.socket] = {}

    def send(self, address: ReplyAddress, rows: list[list]) -> None:
        """Write one frame of delta rows; raises OSError (and forgets the link) if the router is gone."""
        try:
            sock = self._sockets.get(address) or self._connect(address)
            sock.sendall(encode_frame(rows))
        except OSError:
            self.drop(address)
            raise

    def drop(self, address: ReplyAddress) -> None:
        sock = self._sockets.pop(address, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for address in list(self._sockets):
            self.drop(address)

    def _connect(self, address: ReplyAddress) -> socket.socket:
        hello = encode_handshake(address.token)
        sock = socket.create_connection((address.host, address.port), timeout=CONNECT_TIMEOUT_S)
        self._sockets[address] = sock  # from here a failure drops (closes) it
        sock.settimeout(SEND_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame is a token: no Nagle delay
        sock.sendall(hello)
        return sock
