"""The delta channel against hostile peers on 127.0.0.1: what it costs the router before a peer has
authenticated, and what an authenticated engine connection may touch."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc

from k2ray.serve.args import ChannelLimits
from k2ray.serve.channel.delta_receiver import CONNECTION_LOST, DeltaReceiver
from k2ray.serve.channel.delta_wire import (
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    encode_delta,
    encode_frame,
    encode_handshake,
)
from k2ray.serve.channel.socket_links import SocketLinks
from k2ray.serve.engine.engine_protocol import DeltaBuffer, EngineDelta, EngineFailure, ReplyAddress

HOST = "127.0.0.1"
WAIT_S = 5.0  # bound on every wait here; the router's own time-outs are set far from it either way
CHUNK_BYTES = 256 << 10


def _receiver(handshake_timeout_s: float = 60.0, max_pending_connections: int = 32) -> DeltaReceiver:
    return DeltaReceiver(HOST, ChannelLimits(handshake_timeout_s=handshake_timeout_s,
                                             max_pending_connections=max_pending_connections))


def _connect(address: ReplyAddress) -> socket.socket:
    sock = socket.create_connection((address.host, address.port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def _flood(address: ReplyAddress, head: bytes, num_bytes: int) -> tuple[int, bool]:
    """Send `head`, then `num_bytes` zeros: (bytes the router's side accepted, whether it hung up)."""
    chunk = memoryview(bytes(CHUNK_BYTES))
    num_sent = 0
    with _connect(address) as sock:
        try:
            sock.sendall(head)
            while num_sent < num_bytes:
                num_sent += sock.send(chunk[: num_bytes - num_sent])
        except (ConnectionResetError, BrokenPipeError):
            return num_sent, True
        except TimeoutError:  # the router neither reads nor hangs up
            return num_sent, False
    return num_sent, False


def _is_hung_up(sock: socket.socket) -> bool:
    """Whether the router closes `sock` (within WAIT_S) without sending anything."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def _take(buffer: DeltaBuffer) -> EngineDelta:
    return await asyncio.wait_for(buffer.take(), WAIT_S)


async def test_a_huge_length_prefix_before_the_handshake_is_never_buffered() -> None:
    receiver = _receiver()
    address = await receiver.start()
    tracemalloc.start()
    try:
        # The old handshake was a frame read before the token was checked: up to MAX_FRAME_BYTES buffered.
        num_sent, is_hung_up = await asyncio.to_thread(_flood, address, FRAME_HEADER.pack(MAX_FRAME_BYTES),
                                                       MAX_FRAME_BYTES)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await receiver.stop()
    assert is_hung_up
    assert num_sent < MAX_FRAME_BYTES // 8  # what the kernels' socket buffers took before the reset
    assert peak_bytes < MAX_FRAME_BYTES // 16  # the router process never held the flood


async def test_a_peer_that_sends_nothing_is_dropped_after_the_handshake_timeout() -> None:
    receiver = _receiver(handshake_timeout_s=0.2)
    address = await receiver.start()
    try:
        with _connect(address) as silent:
            assert await asyncio.to_thread(_is_hung_up, silent)
    finally:
        await receiver.stop()


async def test_connections_beyond_the_pending_cap_are_refused_and_the_pending_ones_kept() -> None:
    receiver = _receiver(max_pending_connections=2)
    address = await receiver.start()
    held = [_connect(address) for _ in range(2)]
    try:
        with _connect(address) as extra:
            assert await asyncio.to_thread(_is_hung_up, extra)
        buffer, reply_to = receiver.open("r")
        # A held connection was only waiting: it still authenticates and carries deltas.
        row = encode_delta("r", EngineDelta([7], finish_reason="stop"), reply_to.claim)
        held[0].sendall(encode_handshake(address.token) + encode_frame([row]))
        assert (await _take(buffer)).token_ids == [7]
        assert receiver.num_connections == 1
    finally:
        for sock in held:
            sock.close()
        await receiver.stop()


def _send(links: SocketLinks, address: ReplyAddress, *rows: list) -> asyncio.Future:
    return asyncio.to_thread(links.send, address, list(rows))


async def test_an_engine_cannot_write_deltas_for_a_request_another_connection_serves() -> None:
    receiver = _receiver()
    address = await receiver.start()
    serving, intruder = SocketLinks(), SocketLinks()  # two engine replicas: two connections
    try:
        (victim, victim_to), (own, own_to) = receiver.open("victim"), receiver.open("intruders-own")
        await _send(serving, address, encode_delta("victim", EngineDelta([1]), victim_to.claim))
        assert (await _take(victim)).token_ids == [1]
        await _send(intruder, address, encode_delta("intruders-own", EngineDelta([9]), own_to.claim))
        assert (await _take(own)).token_ids == [9]
        # Even holding the victim's claim, the intruder cannot write to a request bound elsewhere: its
        # connection is dropped (failing what it carried) and the victim never sees the row.
        await _send(intruder, address, encode_delta("victim", EngineDelta([666], finish_reason="stop"),
                                                    victim_to.claim))
        assert (await _take(own)).failure == EngineFailure("internal", CONNECTION_LOST)
        await _send(serving, address, encode_delta("victim", EngineDelta([2], finish_reason="stop")))
        last = await _take(victim)
        assert (last.token_ids, last.finish_reason, last.failure) == ([2], "stop", None)
    finally:
        serving.close()
        intruder.close()
        await receiver.stop()


async def test_a_first_delta_without_the_requests_claim_is_refused() -> None:
    receiver = _receiver()
    address = await receiver.start()
    serving, intruder = SocketLinks(), SocketLinks()
    try:
        (unbound, unbound_to), (own, own_to) = receiver.open("unbound"), receiver.open("intruders-own")
        await _send(intruder, address, encode_delta("intruders-own", EngineDelta([9]), own_to.claim))
        assert (await _take(own)).token_ids == [9]
        # The request has no connection yet: the first row must carry its claim, not a guess.
        await _send(intruder, address, encode_delta("unbound", EngineDelta([666], finish_reason="stop"),
                                                    own_to.claim))
        assert (await _take(own)).failure == EngineFailure("internal", CONNECTION_LOST)
        await _send(serving, address, encode_delta("unbound", EngineDelta([3], finish_reason="stop"),
                                                   unbound_to.claim))
        last = await _take(unbound)
        assert (last.token_ids, last.finish_reason) == ([3], "stop")
    finally:
        serving.close()
        intruder.close()
        await receiver.stop()
