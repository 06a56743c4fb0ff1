"""The delta channel on 127.0.0.1: wire format, router-side receiver, engine-side links and sink."""

from __future__ import annotations

import asyncio

import pytest

from k2ray.engine.outputs import CompletionOutput, RequestOutput
from k2ray.engine.scheduler import RequestRejected
from k2ray.serve.channel.delta_assembler import DeltaAssembler
from k2ray.serve.channel.delta_receiver import CONNECTION_LOST, DeltaReceiver
from k2ray.serve.channel.delta_wire import (
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    WireError,
    decode_delta,
    encode_delta,
    new_secret,
    read_frame,
)
from k2ray.serve.channel.socket_links import SocketLinks
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure, ReplyAddress

HOST = "127.0.0.1"


def test_wire_round_trip_keeps_ids_logprobs_and_failures() -> None:
    delta = EngineDelta([5, 7], [{5: -0.5, 9: -1.0}, {7: -0.25}], 32, "length")
    assert decode_delta(encode_delta("r1", delta, "claim")) == ("r1", delta, "claim")
    failed = EngineDelta(failure=EngineFailure("rejected", "too long"))
    assert decode_delta(encode_delta("r2", failed)) == ("r2", failed, None)


@pytest.mark.parametrize("row", [
    ["only", "three", "fields"],
    "not a row",
    [7, [1], None, 0, None, None, None, None],  # request id not a string
    ["r", 5, None, 0, None, None, None, None],  # token ids not a list
    ["r", [1], None, 0, "bogus", None, None, None],  # unknown finish reason
    ["r", [1], None, 0, None, "bogus", "message", None],  # unknown failure kind
    ["r", [1], None, 0, None, None, None, 42],  # claim not a string
])
def test_malformed_rows_are_wire_errors(row: object) -> None:
    with pytest.raises(WireError):
        decode_delta(row)


async def test_oversized_frames_are_refused() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(FRAME_HEADER.pack(MAX_FRAME_BYTES + 1))
    with pytest.raises(WireError):
        await read_frame(reader)


def _send(links: SocketLinks, address: ReplyAddress, *rows: list) -> asyncio.Future:
    # The engine core writes from its (blocking) step loop: off the event loop here.
    return asyncio.to_thread(links.send, address, list(rows))


async def test_deltas_reach_their_buffers_merged_and_unknown_ids_are_dropped() -> None:
    receiver = DeltaReceiver(HOST)
    address = await receiver.start()
    links = SocketLinks()
    try:
        (a, a_to), (b, b_to) = receiver.open("a"), receiver.open("b")
        assert a_to == b_to == address and a_to.claim != b_to.claim  # one connection, a claim per request
        await _send(links, a_to, encode_delta("a", EngineDelta([1], num_cached_tokens=16), a_to.claim))
        await _send(links, b_to, encode_delta("b", EngineDelta([2]), b_to.claim),
                    encode_delta("gone", EngineDelta([3])), encode_delta("a", EngineDelta([4], finish_reason="stop")))
        merged = await asyncio.wait_for(_take_final(a), 5)
        assert (merged.token_ids, merged.num_cached_tokens, merged.finish_reason) == ([1, 4], 16, "stop")
        assert (await asyncio.wait_for(b.take(), 5)).token_ids == [2]
        assert receiver.num_connections == 1  # one connection per router, reused
    finally:
        links.close()
        await receiver.stop()


async def _take_final(buffer) -> EngineDelta:
    merged = await buffer.take()
    while not merged.finished:
        merged.merge(await buffer.take())
    return merged


async def test_a_wrong_token_is_refused() -> None:
    receiver = DeltaReceiver(HOST)
    address = await receiver.start()
    links = SocketLinks()
    try:
        buffer, reply_to = receiver.open("a")
        forged = ReplyAddress(address.host, address.port, new_secret())
        # The router hangs up without reading a delta; the writes after that fail.
        with pytest.raises(OSError):
            async with asyncio.timeout(5):
                while True:
                    await _send(links, forged, encode_delta("a", EngineDelta([1], finish_reason="stop"),
                                                            reply_to.claim))
                    await asyncio.sleep(0.01)
        assert not buffer.finished
    finally:
        links.close()
        await receiver.stop()


async def test_a_dropped_engine_connection_fails_the_requests_it_carried() -> None:
    receiver = DeltaReceiver(HOST)
    address = await receiver.start()
    links = SocketLinks()
    try:
        (carried, carried_to), (idle, _) = receiver.open("carried"), receiver.open("idle")
        await _send(links, address, encode_delta("carried", EngineDelta([1]), carried_to.claim))
        assert (await asyncio.wait_for(carried.take(), 5)).token_ids == [1]
        links.close()
        last = await asyncio.wait_for(carried.take(), 5)
        assert last.failure == EngineFailure("internal", CONNECTION_LOST)
        assert not idle.finished  # its engine call, not this connection, decides its fate
    finally:
        await receiver.stop()


def _output(request_id: str, token_ids: list[int], finish_reason: str | None = None) -> RequestOutput:
    completion = CompletionOutput(0, "", token_ids, None, None, finish_reason=finish_reason)
    return RequestOutput(request_id, None, [0], [completion], finish_reason is not None, 0)


def test_assembler_sends_the_first_delta_then_holds_to_the_stream_interval() -> None:
    assembler = DeltaAssembler(stream_interval=3)
    sent = [assembler.add(_output("r", [t])) for t in (1, 2, 3, 4)]
    assert [d.token_ids if d else None for d in sent] == [[1], None, None, [2, 3, 4]]
    assert assembler.add(_output("r", [5])) is None
    aborted = assembler.abort("r")  # what was held goes out with the abort
    assert (aborted.token_ids, aborted.finish_reason) == ([5], "abort")
    assert assembler.add(_output("q", [1], "length")).finish_reason == "length"
    assert assembler.fail("x", RequestRejected("prompt too long")).failure == EngineFailure("rejected",
                                                                                            "prompt too long")


async def test_core_socket_links_write_frames_and_fail_once_the_router_is_gone() -> None:
    receiver = DeltaReceiver(HOST)
    address = await receiver.start()
    links = SocketLinks()
    try:
        buffer, reply_to = receiver.open("r")
        await asyncio.to_thread(links.send, address, [encode_delta("r", EngineDelta([1, 2]), reply_to.claim)])
        assert (await asyncio.wait_for(buffer.take(), 5)).token_ids == [1, 2]
        await receiver.stop()
        with pytest.raises(OSError):
            async with asyncio.timeout(5):
                while True:  # the first writes after the peer closed may still be buffered
                    await asyncio.to_thread(links.send, address, [encode_delta("r", EngineDelta([3]))])
                    await asyncio.sleep(0.01)
    finally:
        links.close()
