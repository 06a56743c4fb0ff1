"""The engine replica <-> engine core socket: neither side's writes wait on the other's loop.

A request larger than the socket buffer (100K token ids pickle to ~300 KB) must not block the replica's
event loop while the core is busy (here: stopped outright), and with both directions full (the core
blocked writing deltas to a replica whose loop is busy, the replica writing a huge request) neither
side may deadlock.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import pickle
import signal
import socket
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams
from k2ray.serve.args import load_serve_args
from k2ray.serve.engine.engine_core_client import EngineCoreClient
from k2ray.serve.engine.engine_core_protocol import CoreAdd
from k2ray.serve.engine.engine_protocol import EngineRequest
from k2ray.serve.engine.engine_server import EngineServer

PROMPT = list(range(300, 340))
HUGE_PROMPT = [PROMPT[i % len(PROMPT)] for i in range(100_000)]  # ids >= 256: 3 pickled bytes each
TIMEOUT_S = 30
# Long enough that a loop blocked on the core would stay blocked through the whole test; a watchdog
# then unblocks it so the test fails instead of hanging.
WATCHDOG_S = 20.0
NUM_TICKS = 20
TICK_S = 0.01
NUM_FLOOD_STREAMS = 16
FLOOD = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True, logprobs=20)  # big deltas
FILL_POLL_S = 0.3
NUM_STABLE_POLLS = 3


@pytest.fixture(scope="module")
def server() -> Iterator[EngineServer]:
    engine = {"block_size": 16, "num_kv_blocks": 1024, "max_model_len": 1024, "max_num_seqs": 32}
    engine_server = EngineServer(load_serve_args({"model": str(tiny_checkpoint_dir()), "engine": engine}))
    yield engine_server
    engine_server.shutdown()


def _core(server: EngineServer) -> EngineCoreClient:
    return server._core  # noqa: SLF001 - the test drives the socket between replica and core


def _replica_socket(core: EngineCoreClient) -> socket.socket:
    return socket.socket(fileno=os.dup(core._conn.fileno()))  # noqa: SLF001


def _bytes_queued(sock: socket.socket) -> int:
    queued = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, queued)
    return queued[0]


def _assert_too_big_for_the_socket(core: EngineCoreClient, request: EngineRequest) -> None:
    message = CoreAdd(request.request_id, request.prompt_token_ids, request.sampling_params, None)
    with _replica_socket(core) as sock:
        assert len(pickle.dumps(message)) > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


async def test_a_huge_request_never_blocks_the_replicas_loop(server: EngineServer) -> None:
    core = _core(server)
    pid = core._process.pid  # noqa: SLF001
    huge = EngineRequest("huge", HUGE_PROMPT, SamplingParams(max_tokens=4))
    _assert_too_big_for_the_socket(core, huge)
    other = core.stream(EngineRequest("other", PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
    await asyncio.wait_for(other.take(), TIMEOUT_S)  # streaming
    resumed = threading.Event()

    def resume() -> None:
        resumed.set()
        os.kill(pid, signal.SIGCONT)

    watchdog = threading.Timer(WATCHDOG_S, resume)
    os.kill(pid, signal.SIGSTOP)  # the core in the longest step there is: it reads nothing
    watchdog.start()
    ticks_while_stopped = 0
    try:
        buffer = core.stream(huge)  # a blocking write would wait here until the watchdog resumes the core
        for _ in range(NUM_TICKS):
            await asyncio.sleep(TICK_S)
            ticks_while_stopped += not resumed.is_set()
    finally:
        watchdog.cancel()
        resume()
    assert ticks_while_stopped == NUM_TICKS  # the loop kept running while the core could not read
    last = await asyncio.wait_for(buffer.take(), TIMEOUT_S)
    assert last.failure is not None and last.failure.kind == "rejected"  # read whole once the core ran again
    tokens = []
    while (delta := await asyncio.wait_for(other.take(), TIMEOUT_S)) is not None:
        tokens += delta.token_ids
        if delta.finished:
            break
    assert delta.finish_reason == "length"


def _hold_the_loop_until_the_core_cannot_write(sock: socket.socket) -> int:
    """Block the event loop (as a handler that never yields would) while the core's deltas pile up in
    the replica's socket, until they stop growing: the core is blocked writing to the replica."""
    queued, num_stable = -1, 0
    while num_stable < NUM_STABLE_POLLS:
        time.sleep(FILL_POLL_S)
        now = _bytes_queued(sock)
        num_stable = num_stable + 1 if now == queued else 0
        queued = now
    return queued


async def test_both_directions_full_do_not_deadlock(server: EngineServer) -> None:
    core = _core(server)
    flood_ids = [f"flood-{i}" for i in range(NUM_FLOOD_STREAMS)]
    floods = [core.stream(EngineRequest(rid, PROMPT, FLOOD)) for rid in flood_ids]
    for buffer in floods:
        await asyncio.wait_for(buffer.take(), TIMEOUT_S)  # all running
    huge = EngineRequest("huge-2", HUGE_PROMPT, SamplingParams(max_tokens=4))
    _assert_too_big_for_the_socket(core, huge)
    watchdog = threading.Timer(WATCHDOG_S, core._process.kill)  # noqa: SLF001 - ends a deadlock as a failure
    with _replica_socket(core) as sock:
        assert _hold_the_loop_until_the_core_cannot_write(sock) > 0
        watchdog.start()
        try:
            buffer = core.stream(huge)
        finally:
            watchdog.cancel()
    assert core.is_alive
    last = await asyncio.wait_for(buffer.take(), TIMEOUT_S)
    assert last.failure is not None and last.failure.kind == "rejected"
    for buffer in floods:  # streaming again
        delta = await asyncio.wait_for(buffer.take(), TIMEOUT_S)
        assert delta.token_ids and not delta.finished
    for request_id in flood_ids:
        core.forget(request_id)
        await asyncio.wait_for(core.abort(request_id), TIMEOUT_S)
    stats = await core.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
