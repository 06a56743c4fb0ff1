"""The engine core process: LLMEngine's step loop alone in its own interpreter.

An engine replica (Serve actor) starts one with `python -m k2ray.serve.engine.engine_core FD`, FD being its end
of a socket pair. Alone in the process, the step loop never waits for the GIL behind Serve's request
handling (vLLM's EngineCore split, for the same reason). A reader thread drains the replica's socket
into a queue whatever the step loop is doing, so a large request never waits on a step (and the two
processes can never both block writing to each other); between steps the loop takes the queued
messages. After each step it writes every router's deltas as one frame on that router's delta
channel, and tells the replica which requests finished so their Serve calls return.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import torch

from k2ray.engine.errors import EngineError, EngineStepError
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.outputs import RequestOutput
from k2ray.engine.scheduler import RequestRejected
from k2ray.serve.channel.delta_assembler import DeltaAssembler
from k2ray.serve.channel.delta_wire import encode_delta
from k2ray.serve.channel.socket_links import SocketLinks
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
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure, ReplyAddress
from k2ray.serve.pd.decode_agent import DecodeAgent
from k2ray.serve.pd.pd_protocol import CoreReserve
from k2ray.serve.pd.prefill_agent import PrefillAgent

if TYPE_CHECKING:
    from k2ray.serve.test_hooks import CoreInjector

logger = logging.getLogger(__name__)

# How long the idle loop waits for a message before checking again.
IDLE_WAIT_S = 0.5


class Inbox:
    """The replica's messages, read off the socket by a thread of its own."""

    def __init__(self, conn: Connection) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, args=(conn,), name="core-inbox", daemon=True)
        self._thread.start()

    def get(self, timeout_s: float) -> object | None:
        """The next message, or None if none came within `timeout_s`; CoreShutdown once the replica
        asked to shut down or is gone."""
        try:
            return self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def put(self, message: object) -> None:
        """A message from one of the core's own threads (a KV transfer that ended)."""
        self._queue.put(message)

    def _read(self, conn: Connection) -> None:
        try:
            while not isinstance(message := conn.recv(), CoreShutdown):
                self._queue.put(message)
        except (EOFError, OSError):
            pass
        self._queue.put(CoreShutdown())


class EngineCore:
    # Errors a step may raise that end the core instead of its requests (an EP core's lost group).
    FATAL_ERRORS: tuple[type[BaseException], ...] = ()

    def __init__(self, conn: Connection, config: CoreConfig) -> None:
        self.conn = conn
        self.engine = self._make_engine(config)
        self.assembler = DeltaAssembler(config.stream_interval)
        self.injector = _make_injector() if config.allow_injection else None
        self.links = SocketLinks()
        self.inbox = Inbox(conn)
        self.prefill_agent, self.decode_agent = self._make_agents(config)
        self.routes: dict[str, ReplyAddress | None] = {}  # running request -> where its deltas go
        # This step's deliveries: frames per router, deltas for the replica, finished channel requests.
        self._rows: dict[ReplyAddress, list[list]] = defaultdict(list)
        self._pipe_deltas: list[tuple[str, EngineDelta]] = []
        self._finished_ids: list[str] = []

    def _make_engine(self, config: CoreConfig) -> LLMEngine:
        return LLMEngine(config.engine)

    def _run_step(self) -> list[RequestOutput]:
        return self.engine.step()

    def _make_agents(self, config: CoreConfig) -> tuple[PrefillAgent | None, DecodeAgent | None]:
        role, pd = config.engine.role, config.pd
        if role == "both" or pd is None:
            return None, None
        if role == "prefill":
            blocks = None
            if config.allow_injection and pd.send_chunk_delay_s > 0:
                from k2ray.serve.test_hooks import SlowBlockStore  # fenced: test deployments only

                blocks = SlowBlockStore(self.engine.model_runner, pd.send_chunk_delay_s)
            return PrefillAgent(self.engine, pd.transfer, self._reply, self.inbox.put, blocks), None
        return None, DecodeAgent(self.engine, pd.transfer, pd.host, pd.core_id, self._reply, self.inbox.put,
                                 self._add)

    def _reply(self, ack_id: int, payload: object) -> None:
        self.conn.send(CoreAck(ack_id, payload))

    def ready(self) -> CoreReady:
        manager = self.engine.kv_cache_manager
        return CoreReady(min(self.engine.max_model_len, manager.num_total_blocks * manager.block_size),
                         manager.block_size)

    def run(self) -> None:
        self.conn.send(self.ready())
        while self._take_messages(self.inbox, self._wait_s()):
            if self.engine.has_unfinished_requests():
                self._step()
            if self.injector is not None:
                self._replay_scripts()
            self._tend_agents()
            self._flush()
        for agent in (self.prefill_agent, self.decode_agent):
            if agent is not None:
                agent.close()
        self.links.close()

    def _tend_agents(self) -> None:
        """Between steps: reservations that waited for blocks, and leases that ran out while idle."""
        if self.prefill_agent is not None:
            self.prefill_agent.expire_idle_leases()
        if self.decode_agent is not None:
            self.decode_agent.admit_waiting()
            for request_id in self.decode_agent.expire_idle_leases():
                self._fail(request_id, EngineError("the prompt's KV did not arrive within its lease"))

    def _wait_s(self) -> float:
        if self.engine.has_unfinished_requests():
            return 0
        return IDLE_WAIT_S if self.injector is None else self.injector.wait_s(IDLE_WAIT_S)

    def _take_messages(self, inbox: Inbox, timeout_s: float) -> bool:
        """Handle what the replica sent; False once it asked to shut down (or is gone)."""
        while (message := inbox.get(timeout_s)) is not None:
            timeout_s = 0
            if isinstance(message, CoreShutdown):
                return False
            self._handle(message)
        return True

    def _handle(self, message: object) -> None:
        for agent in (self.prefill_agent, self.decode_agent):
            if agent is not None and isinstance(message, agent.MESSAGES):
                if isinstance(message, CoreReserve):
                    self.routes[message.add.request_id] = message.add.reply_to
                    self._track_remote_injection(message.add)
                agent.handle(message)
                self._flush()  # a failed reservation's delta goes out now
                return
        if isinstance(message, CoreAdd):
            self._add(message)
        elif isinstance(message, CoreAbort):
            self._abort(message.request_id, message.failure)
            self._flush()  # the aborted delta goes out before the replica hears the abort is done
            self.conn.send(CoreAck(message.ack_id))
        elif isinstance(message, CoreStatsQuery):
            self.conn.send(CoreAck(message.ack_id, self.stats()))
        else:
            raise TypeError(f"unexpected message {message!r}")

    def stats(self) -> dict[str, int]:
        """The engine's stats, plus the core's own per-request state (zero once nothing runs)."""
        num_injected = 0 if self.injector is None else self.injector.num_requests
        stats = {**asdict(self.engine.get_stats()), "num_routed_requests": len(self.routes),
                 "num_assembling_requests": self.assembler.num_requests, "num_injected_requests": num_injected}
        for agent in (self.prefill_agent, self.decode_agent):
            if agent is not None:
                stats.update(agent.stats())
        return stats

    def _abort(self, request_id: str, failure: EngineFailure | None = None) -> None:
        if self.prefill_agent is not None and self.prefill_agent.abort(request_id):
            return
        # A decode-side receive is cancelled first: no byte of it lands in blocks freed below.
        in_engine = self.decode_agent is None or self.decode_agent.abort(request_id)
        is_scripted = self.injector is not None and self.injector.forget(request_id)
        is_aborted = in_engine and bool(self.engine.abort_requests([request_id]))
        if failure is not None:
            self.assembler.forget(request_id)
            self._deliver(request_id, EngineDelta(failure=failure))
        elif is_scripted or is_aborted:
            self._deliver(request_id, self.assembler.abort(request_id))

    def _add(self, message: CoreAdd) -> None:
        self.routes[message.request_id] = message.reply_to
        try:
            if message.injection is not None and self._start_injected(message):
                return
            request = self.engine.make_request(message.request_id, message.prompt_token_ids, message.sampling_params)
            self.engine.add_prepared_request(request, stream=True)
        except Exception as exc:  # rejected (too long, bad schema) or invalid
            self._fail(message.request_id, exc)
            self._flush()

    def _track_remote_injection(self, add: CoreAdd) -> None:
        """A test hook on a request prefilled elsewhere (fail after N tokens) is applied where it decodes;
        a scripted request is prefilled here, through _add."""
        injection = add.injection
        if self.injector is not None and injection is not None and injection.script_token_ids is None:
            self.injector.start(add.request_id, add.sampling_params, injection)

    def _start_injected(self, message: CoreAdd) -> bool:
        """True if the injector replays the request itself (scripted), instead of the engine."""
        if self.injector is None:
            raise RequestRejected("k2ray_test is only accepted by test deployments")
        return self.injector.start(message.request_id, message.sampling_params, message.injection)

    def _step(self) -> None:
        step_start = time.monotonic()
        try:
            outputs = self._run_step()
        except self.FATAL_ERRORS:
            raise
        except EngineStepError as exc:
            logger.error("engine step failed: %r", exc.__cause__)
            for request_id in exc.request_ids:
                self._fail(request_id, exc)
            return
        except Exception as exc:  # not tied to a step's requests: fail them all, keep serving
            logger.exception("engine failure")
            request_ids = list(self.engine.scheduler.requests)
            self.engine.abort_requests(request_ids)
            for request_id in request_ids:
                self._fail(request_id, EngineError(repr(exc)))
            return
        if self.prefill_agent is not None:
            self.prefill_agent.after_step(step_start)
        self._emit(outputs)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if self.prefill_agent is not None and self.prefill_agent.on_output(output):
                continue
            if self.injector is not None and self.injector.fails(output):
                self.engine.abort_requests([output.request_id])
                self._fail(output.request_id, self.injector.failure())
            elif (delta := self.assembler.add(output)) is not None:
                self._deliver(output.request_id, delta)

    def _replay_scripts(self) -> None:
        outputs, failed_ids = self.injector.due()
        self._emit(outputs)
        for request_id in failed_ids:
            self._fail(request_id, self.injector.failure())

    def _fail(self, request_id: str, error: BaseException) -> None:
        if self.prefill_agent is not None and self.prefill_agent.on_failure(request_id, error):
            return
        if self.decode_agent is not None:
            self.decode_agent.forget([request_id])
        if self.injector is not None:
            self.injector.forget(request_id)
        self._deliver(request_id, self.assembler.fail(request_id, error))

    def _deliver(self, request_id: str, delta: EngineDelta) -> None:
        if request_id not in self.routes:
            return
        address = self.routes[request_id]
        if delta.finished:
            del self.routes[request_id]
        if address is None:
            self._pipe_deltas.append((request_id, delta))
            return
        self._rows[address].append(encode_delta(request_id, delta, address.claim))
        if delta.finished:
            self._finished_ids.append(request_id)
        elif address.claim is not None:  # its first row bound it to this link: later rows need no claim
            self.routes[request_id] = replace(address, claim=None)

    def _flush(self) -> None:
        for address, rows in self._rows.items():
            try:
                self.links.send(address, rows)
            except OSError as exc:
                self._drop_router(address, exc)
        self._rows.clear()
        if self._pipe_deltas:
            self.conn.send(CoreDeltas(self._pipe_deltas))
            self._pipe_deltas = []
        if self._finished_ids:
            self.conn.send(CoreFinished(self._finished_ids))
            self._finished_ids = []

    def _drop_router(self, address: ReplyAddress, exc: OSError) -> None:
        """The router replica is gone: abort its requests and end their Serve calls."""
        orphans = [rid for rid, route in self.routes.items() if route == address]
        logger.warning("router %s:%d unreachable (%r): aborting %d requests", address.host, address.port, exc,
                       len(orphans))
        if self.decode_agent is not None:  # receives first: nothing lands in the blocks freed below
            for request_id in orphans:
                self.decode_agent.abort(request_id)
        self.engine.abort_requests(orphans)
        for request_id in orphans:
            del self.routes[request_id]
            self.assembler.forget(request_id)
            if self.injector is not None:
                self.injector.forget(request_id)
        self._finished_ids.extend(orphans)


def _make_injector() -> CoreInjector:
    from k2ray.serve.test_hooks import CoreInjector  # fenced: only test deployments load it

    return CoreInjector()


def main(argv: list[str], core_class: type[EngineCore] = EngineCore) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    config: CoreConfig = conn.recv()
    if config.cpu_affinity is not None:
        os.sched_setaffinity(0, config.cpu_affinity)
    torch.set_num_threads(config.torch_threads)
    try:
        core = core_class(conn, config)
    except Exception as exc:
        logger.exception("engine core failed to start")
        conn.send(CoreFailed(f"engine core failed to start: {exc!r}"))
        return
    core.run()


if __name__ == "__main__":
    main(sys.argv[1:])
