"""EngineServer without Ray: the real engine in its core process, deltas over a real delta channel on
127.0.0.1 (or streamed back through the call)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator

import pytest

from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams
from k2ray.serve.args import load_serve_args
from k2ray.serve.channel.delta_receiver import DeltaReceiver
from k2ray.serve.engine.core_replica import engine_config
from k2ray.serve.engine.engine_core_client import EngineCoreClient, EngineCoreDied
from k2ray.serve.engine.engine_core_protocol import CoreConfig
from k2ray.serve.engine.engine_protocol import DeltaBuffer, EngineDelta, EngineRequest, ReplyAddress
from k2ray.serve.engine.engine_server import EngineServer
from k2ray.serve.test_hooks import Injection

PROMPT = list(range(300, 340))
LONG = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
TIMEOUT_S = 30
POLL_S = 0.01
MODEL = str(tiny_checkpoint_dir())
ENGINE = {"block_size": 4, "num_kv_blocks": 256, "max_model_len": 1024}


@pytest.fixture(scope="module")
def server() -> Iterator[EngineServer]:
    engine_server = EngineServer(load_serve_args({"model": MODEL, "engine": ENGINE}))
    yield engine_server
    engine_server.shutdown()


@pytest.fixture(scope="module")
def injecting() -> Iterator[EngineServer]:
    """A test deployment (`testing.allow_injection`): the core replays and fails requests on demand."""
    engine_server = EngineServer(load_serve_args({"model": MODEL, "engine": ENGINE,
                                                  "testing": {"allow_injection": True}}))
    yield engine_server
    engine_server.shutdown()


async def _assert_freed_now(server: EngineServer) -> None:
    """The call aborts before it returns: no waiting for the request to run out."""
    stats = await server.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_routed_requests"] == stats["num_assembling_requests"] == 0


async def _wait_idle(server: EngineServer) -> dict[str, int]:
    for _ in range(int(TIMEOUT_S / POLL_S)):
        stats = await server.stats()
        if stats["num_running"] == stats["num_waiting"] == stats["num_routed_requests"] == 0:
            break
        await asyncio.sleep(POLL_S)
    return stats


async def _assert_idle(server: EngineServer) -> None:
    stats = await _wait_idle(server)
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_routed_requests"] == stats["num_assembling_requests"] == 0


async def _drain(buffer: DeltaBuffer) -> tuple[list[int], EngineDelta]:
    tokens, last = [], None
    while last is None or not last.finished:
        last = await asyncio.wait_for(buffer.take(), TIMEOUT_S)
        tokens += last.token_ids
    return tokens, last


def _request(request_id: str, reply_to: ReplyAddress, params: SamplingParams = LONG,
             prompt: list[int] = PROMPT) -> EngineRequest:
    return EngineRequest(request_id, prompt, params, reply_to=reply_to)


async def test_submit_streams_every_token_and_returns_after_the_final_delta(server: EngineServer) -> None:
    receiver = DeltaReceiver("127.0.0.1")
    await receiver.start()
    try:
        opened = {rid: receiver.open(rid) for rid in ("a", "b")}
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        calls = [server.submit(_request(rid, to, params)) for rid, (_, to) in opened.items()]
        await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT_S)
        for buffer, _ in opened.values():
            tokens, last = await _drain(buffer)
            assert len(tokens) == 12 and last.finish_reason == "length"
        rejected, to = receiver.open("too-long")
        await server.submit(_request("too-long", to, params, [5] * 1100))
        assert (await asyncio.wait_for(rejected.take(), TIMEOUT_S)).failure.kind == "rejected"
    finally:
        await receiver.stop()
    await _assert_idle(server)


async def test_submit_without_a_reply_address_is_refused(server: EngineServer) -> None:
    with pytest.raises(ValueError, match="reply address"):
        await server.submit(EngineRequest("nowhere", PROMPT, LONG))


async def test_cancelling_the_call_aborts_the_request(server: EngineServer) -> None:
    receiver = DeltaReceiver("127.0.0.1")
    await receiver.start()
    try:
        buffer, to = receiver.open("cancelled")
        call = asyncio.ensure_future(server.submit(_request("cancelled", to)))
        await asyncio.wait_for(buffer.take(), TIMEOUT_S)  # running and streaming
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await _assert_freed_now(server)
    finally:
        await receiver.stop()


async def test_a_router_that_goes_away_gets_its_requests_aborted_and_forgotten(server: EngineServer) -> None:
    receiver = DeltaReceiver("127.0.0.1")
    await receiver.start()
    opened = {rid: receiver.open(rid) for rid in ("orphan-a", "orphan-b")}
    calls = [asyncio.ensure_future(server.submit(_request(rid, to))) for rid, (_, to) in opened.items()]
    for buffer, _ in opened.values():
        await asyncio.wait_for(buffer.take(), TIMEOUT_S)
    stats = await server.stats()
    assert stats["num_routed_requests"] == stats["num_assembling_requests"] == 2  # what must be cleared
    await receiver.stop()  # the router replica is gone: the next writes fail
    await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT_S)
    await _assert_freed_now(server)  # blocks, routes and the assembler's per-request state


async def test_generate_streams_the_same_tokens_back_through_the_call(server: EngineServer) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    receiver = DeltaReceiver("127.0.0.1")
    await receiver.start()
    try:
        buffer, to = receiver.open("by-channel")
        await asyncio.wait_for(server.submit(_request("by-channel", to, params)), TIMEOUT_S)
        channel_tokens, _ = await _drain(buffer)
    finally:
        await receiver.stop()
    streamed = [d async for d in server.generate(EngineRequest("by-call", PROMPT, params))]
    assert [t for d in streamed for t in d.token_ids] == channel_tokens and len(channel_tokens) == 8
    assert streamed[-1].finish_reason == "length"
    await _assert_idle(server)


def test_a_core_that_cannot_start_fails_the_replica() -> None:
    with pytest.raises(EngineCoreDied, match="failed to start"):
        EngineServer(load_serve_args({"model": "/nonexistent/checkpoint"}))


def test_a_core_that_never_answers_fails_the_replica_and_is_killed(tmp_path) -> None:
    pid_file = tmp_path / "pid"
    silent = (sys.executable, "-c",
              f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    args = load_serve_args({"model": MODEL, "engine": ENGINE})
    with pytest.raises(EngineCoreDied, match="did not answer within 1 s"):
        EngineCoreClient(CoreConfig(engine_config(args), 1, 1), startup_timeout_s=1.0, core_command=silent)
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(int(pid_file.read_text()), 0)


async def test_a_dead_core_fails_its_calls_and_the_health_check() -> None:
    doomed = EngineServer(load_serve_args({"model": MODEL,
                                           "engine": {"block_size": 4, "num_kv_blocks": 256}}))
    receiver = DeltaReceiver("127.0.0.1")
    await receiver.start()
    try:
        buffer, to = receiver.open("doomed")
        call = asyncio.ensure_future(doomed.submit(_request("doomed", to)))
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


SCRIPT = (301, 302, 303, 304, 305)


async def test_the_core_replays_a_scripted_request_over_the_channel(injecting: EngineServer) -> None:
    receiver = DeltaReceiver("127.0.0.1")
    await receiver.start()
    try:
        cases = {  # request -> (sampling params, expected tokens, expected finish)
            "to-the-end": (SamplingParams(max_tokens=50), list(SCRIPT), "stop"),
            "stop-token": (SamplingParams(max_tokens=50, stop_token_ids=[303]), [301, 302, 303], "stop"),
            "max-tokens": (SamplingParams(max_tokens=2), [301, 302], "length"),
        }
        for request_id, (params, expected, finish) in cases.items():
            buffer, to = receiver.open(request_id)
            request = EngineRequest(request_id, PROMPT, params, Injection(SCRIPT), reply_to=to)
            await asyncio.wait_for(injecting.submit(request), TIMEOUT_S)
            tokens, last = await _drain(buffer)
            assert (tokens, last.finish_reason) == (expected, finish), request_id
    finally:
        await receiver.stop()
    await _assert_idle(injecting)
    assert (await injecting.stats())["num_injected_requests"] == 0


async def test_an_injected_failure_fails_the_real_request_over_the_channel(injecting: EngineServer) -> None:
    receiver = DeltaReceiver("127.0.0.1")
    await receiver.start()
    try:
        # The real request fails in place of its third token's delta; the script before its third token.
        for request_id, injection in (("real", Injection(fail_after_tokens=3)),
                                      ("scripted", Injection(SCRIPT, fail_after_tokens=2))):
            buffer, to = receiver.open(request_id)
            request = EngineRequest(request_id, PROMPT, LONG, injection, reply_to=to)
            await asyncio.wait_for(injecting.submit(request), TIMEOUT_S)
            tokens, last = await _drain(buffer)
            assert last.failure is not None and last.failure.kind == "internal", request_id
            assert len(tokens) == 2, request_id
    finally:
        await receiver.stop()
    await _assert_idle(injecting)  # the real request was aborted and its blocks freed
    assert (await injecting.stats())["num_injected_requests"] == 0


async def test_a_production_core_rejects_injected_requests(server: EngineServer) -> None:
    streamed = [d async for d in server.generate(EngineRequest("sneaky", PROMPT, LONG, Injection(SCRIPT)))]
    assert len(streamed) == 1 and streamed[0].failure.kind == "rejected"
    assert "k2ray_test" in streamed[0].failure.message
    await _assert_idle(server)
