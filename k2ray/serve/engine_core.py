"""The engine core process: LLMEngine's step loop alone in its own interpreter.

An engine replica (Serve actor) starts one with `python -m k2ray.serve.engine_core FD`, FD being its end
of a socket pair. Alone in the process, the step loop never waits for the GIL behind Serve's request
handling (vLLM's EngineCore split, for the same reason). Between steps it takes the replica's
messages; after each step it writes every router's deltas as one frame on that router's delta
channel, and tells the replica which requests finished so their Serve calls return.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from dataclasses import asdict
from multiprocessing.connection import Connection

import torch

from k2ray.engine.llm_engine import EngineError, EngineStepError, LLMEngine
from k2ray.serve.delta_assembler import DeltaAssembler
from k2ray.serve.delta_wire import encode_delta
from k2ray.serve.engine_core_protocol import (
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
from k2ray.serve.engine_protocol import EngineDelta, ReplyAddress
from k2ray.serve.socket_links import SocketLinks

logger = logging.getLogger(__name__)

# How long the idle loop waits for a message before checking again.
IDLE_WAIT_S = 0.5


class EngineCore:
    def __init__(self, conn: Connection, config: CoreConfig) -> None:
        self.conn = conn
        self.engine = LLMEngine(config.engine)
        self.assembler = DeltaAssembler(config.stream_interval)
        self.links = SocketLinks()
        self.routes: dict[str, ReplyAddress | None] = {}  # running request -> where its deltas go
        # This step's deliveries: frames per router, deltas for the replica, finished channel requests.
        self._rows: dict[ReplyAddress, list[list]] = defaultdict(list)
        self._pipe_deltas: list[tuple[str, EngineDelta]] = []
        self._finished_ids: list[str] = []

    def ready(self) -> CoreReady:
        manager = self.engine.kv_cache_manager
        return CoreReady(min(self.engine.max_model_len, manager.num_total_blocks * manager.block_size))

    def run(self) -> None:
        self.conn.send(self.ready())
        while self._take_messages(0 if self.engine.has_unfinished_requests() else IDLE_WAIT_S):
            if self.engine.has_unfinished_requests():
                self._step()
                self._flush()
        self.links.close()

    def _take_messages(self, timeout_s: float) -> bool:
        """Handle what the replica sent; False once it asked to shut down (or is gone)."""
        try:
            while self.conn.poll(timeout_s):
                timeout_s = 0
                message = self.conn.recv()
                if isinstance(message, CoreShutdown):
                    return False
                self._handle(message)
        except (EOFError, OSError):
            return False
        return True

    def _handle(self, message: object) -> None:
        if isinstance(message, CoreAdd):
            self._add(message)
        elif isinstance(message, CoreAbort):
            for request in self.engine.abort_requests([message.request_id]):
                self._deliver(request.request_id, self.assembler.abort(request.request_id))
            self._flush()  # the aborted delta goes out before the replica hears the abort is done
            self.conn.send(CoreAck(message.ack_id))
        elif isinstance(message, CoreStatsQuery):
            self.conn.send(CoreAck(message.ack_id, asdict(self.engine.get_stats())))
        else:
            raise TypeError(f"unexpected message {message!r}")

    def _add(self, message: CoreAdd) -> None:
        self.routes[message.request_id] = message.reply_to
        try:
            request = self.engine.make_request(message.request_id, message.prompt_token_ids, message.sampling_params)
            self.engine.add_prepared_request(request, stream=True)
        except Exception as exc:  # rejected (too long, bad schema) or invalid
            self._deliver(message.request_id, self.assembler.fail(message.request_id, exc))
            self._flush()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineStepError as exc:
            logger.error("engine step failed: %r", exc.__cause__)
            for request_id in exc.request_ids:
                self._deliver(request_id, self.assembler.fail(request_id, exc))
            return
        except Exception as exc:  # not tied to a step's requests: fail them all, keep serving
            logger.exception("engine failure")
            request_ids = list(self.engine.scheduler.requests)
            self.engine.abort_requests(request_ids)
            for request_id in request_ids:
                self._deliver(request_id, self.assembler.fail(request_id, EngineError(repr(exc))))
            return
        for output in outputs:
            if (delta := self.assembler.add(output)) is not None:
                self._deliver(output.request_id, delta)

    def _deliver(self, request_id: str, delta: EngineDelta) -> None:
        if request_id not in self.routes:
            return
        address = self.routes[request_id]
        if delta.finished:
            del self.routes[request_id]
        if address is None:
            self._pipe_deltas.append((request_id, delta))
            return
        self._rows[address].append(encode_delta(request_id, delta))
        if delta.finished:
            self._finished_ids.append(request_id)

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
        self.engine.abort_requests(orphans)
        for request_id in orphans:
            del self.routes[request_id]
        self._finished_ids.extend(orphans)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    config: CoreConfig = conn.recv()
    torch.set_num_threads(config.torch_threads)
    try:
        core = EngineCore(conn, config)
    except Exception as exc:
        logger.exception("engine core failed to start")
        conn.send(CoreFailed(f"engine core failed to start: {exc!r}"))
        return
    core.run()


if __name__ == "__main__":
    main(sys.argv[1:])
