"""EngineServer.submit without Ray: the real engine, deltas over a real delta channel on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from k2ray.sampling_params import SamplingParams
from k2ray.serve.args import load_serve_args
from k2ray.serve.delta_receiver import DeltaReceiver
from k2ray.serve.engine_core_client import EngineCoreDied
from k2ray.serve.engine_protocol import EngineRequest
from k2ray.serve.engine_server import EngineServer

PROMPT = list(range(300, 340))
LONG = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server() -> Iterator[EngineServer]:
    engine_server = EngineServer(load_serve_args({"engine": {"block_size": 4, "num_kv_blocks": 256,
                                                             "max_model_len": 1024}}))
    yield engine_server
    engine_server.shutdown()


async def _assert_freed_now(server: EngineServer) -> None:
    """The call aborts before it returns: no waiting for the request to run out."""
    stats = await server.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


async def _assert_idle(server: EngineServer) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            stats = await server.stats()
            if stats["num_running"] == stats["num_waiting"] == 0:
                break
            await asyncio.sleep(0.01)
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


async def test_submit_streams_every_token_and_returns_after_the_final_delta(server: EngineServer) -> None:
    receiver = DeltaReceiver("127.0.0.1")
    address = await receiver.start()
    try:
        buffers = {rid: receiver.open(rid) for rid in ("a", "b")}
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        calls = [server.submit(EngineRequest(rid, PROMPT, params, reply_to=address)) for rid in buffers]
        await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT_S)
        for buffer in buffers.values():
            tokens, last = [], None
            while not (last is not None and last.finished):
                last = await asyncio.wait_for(buffer.take(), TIMEOUT_S)
                tokens += last.token_ids
            assert len(tokens) == 12 and last.finish_reason == "length"
        rejected = receiver.open("too-long")
        await server.submit(EngineRequest("too-long", [5] * 1100, params, reply_to=address))
        assert (await asyncio.wait_for(rejected.take(), TIMEOUT_S)).failure.kind == "rejected"
    finally:
        await receiver.stop()
    await _assert_idle(server)


async def test_cancelling_the_call_aborts_the_request(server: EngineServer) -> None:
    receiver = DeltaReceiver("127.0.0.1")
    address = await receiver.start()
    try:
        buffer = receiver.open("cancelled")
        call = asyncio.ensure_future(server.submit(EngineRequest("cancelled", PROMPT, LONG, reply_to=address)))
        await asyncio.wait_for(buffer.take(), TIMEOUT_S)  # running and streaming
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await _assert_freed_now(server)
    finally:
        await receiver.stop()


async def test_a_router_that_goes_away_gets_its_requests_aborted(server: EngineServer) -> None:
    receiver = DeltaReceiver("127.0.0.1")
    address = await receiver.start()
    buffer = receiver.open("orphan")
    call = asyncio.ensure_future(server.submit(EngineRequest("orphan", PROMPT, LONG, reply_to=address)))
    await asyncio.wait_for(buffer.take(), TIMEOUT_S)
    await receiver.stop()  # the router replica is gone: the next writes fail
    await asyncio.wait_for(call, TIMEOUT_S)
    await _assert_freed_now(server)


async def test_generate_streams_the_same_tokens_back_through_the_call(server: EngineServer) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    receiver = DeltaReceiver("127.0.0.1")
    address = await receiver.start()
    try:
        buffer = receiver.open("by-channel")
        await asyncio.wait_for(server.submit(EngineRequest("by-channel", PROMPT, params, reply_to=address)), TIMEOUT_S)
        channel_tokens = (await asyncio.wait_for(buffer.take(), TIMEOUT_S)).token_ids
    finally:
        await receiver.stop()
    streamed = [d async for d in server.generate(EngineRequest("by-call", PROMPT, params))]
    assert [t for d in streamed for t in d.token_ids] == channel_tokens and len(channel_tokens) == 8
    assert streamed[-1].finish_reason == "length"
    await _assert_idle(server)


def test_a_core_that_cannot_start_fails_the_replica() -> None:
    with pytest.raises(EngineCoreDied, match="failed to start"):
        EngineServer(load_serve_args({"model": "/nonexistent/checkpoint"}))


async def test_a_dead_core_fails_its_calls_and_the_health_check() -> None:
    doomed = EngineServer(load_serve_args({"engine": {"block_size": 4, "num_kv_blocks": 256}}))
    receiver = DeltaReceiver("127.0.0.1")
    address = await receiver.start()
    try:
        buffer = receiver.open("doomed")
        call = asyncio.ensure_future(doomed.submit(EngineRequest("doomed", PROMPT, LONG, reply_to=address)))
        assert (await asyncio.wait_for(buffer.take(), TIMEOUT_S)).token_ids  # running
        await doomed.check_health()
        doomed._core._process.kill()  # noqa: SLF001 - the test plays the crash
        with pytest.raises(EngineCoreDied):
            await asyncio.wait_for(call, TIMEOUT_S)
        with pytest.raises(EngineCoreDied):
            await doomed.check_health()
        last = await asyncio.wait_for(buffer.take(), TIMEOUT_S)  # the router side hears it too
        assert last.failure is not None
    finally:
        await receiver.stop()
        doomed.shutdown()
