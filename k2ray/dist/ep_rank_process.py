"""An offline EP engine's rank: `python -m k2ray.dist.ep_rank_process FD`, FD its end of a socket pair to the
`EPLLMEngine` that started it (k2ray/engine/ep/ep_protocol.py says what crosses).

A reader thread drains the socket into a queue, so the caller's writes never wait on a step. The loop takes
the queued messages (waiting at most IDLE_WAIT_S while the whole group was idle: nobody spins), agrees with
the other ranks whether any has work, steps in lockstep when one has, and writes the step's outputs back.
Losing the group fails every request of this rank, reports it (RankFailed) and ends the process.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from multiprocessing.connection import Connection

import torch

from k2ray.engine.ep.ep_protocol import (
    RankAbort,
    RankAdd,
    RankConfig,
    RankFailed,
    RankReady,
    RankShutdown,
    RankStepOutputs,
    RankWake,
)
from k2ray.engine.errors import EngineStepError
from k2ray.engine.scheduler import RequestRejected

from .ep_engine import EPEngine
from .ep_group import EPGroupSpec, EPPeerUnavailable

logger = logging.getLogger(__name__)

# How long an idle group's ranks wait for a message before they agree again.
IDLE_WAIT_S = 0.5


class RankInbox:
    """The caller's messages, read by a thread of its own; RankShutdown once the caller is gone."""

    def __init__(self, conn: Connection) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(conn,), name="ep-rank-inbox", daemon=True).start()

    def get(self, timeout_s: float) -> object | None:
        try:
            return self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _read(self, conn: Connection) -> None:
        try:
            while not isinstance(message := conn.recv(), RankShutdown):
                self._queue.put(message)
        except (EOFError, OSError):
            pass
        self._queue.put(RankShutdown())


class RankLoop:
    def __init__(self, conn: Connection, rank: EPEngine) -> None:
        self.conn = conn
        self.rank = rank
        self.inbox = RankInbox(conn)
        self._rejected: dict[str, str] = {}

    def run(self) -> None:
        engine = self.rank.engine
        is_busy = is_stopping = False
        while True:
            is_stopping = self._take_messages(0 if is_busy else IDLE_WAIT_S) or is_stopping
            agreement = self.rank.agree(engine.has_unfinished_requests(), is_stopping)
            if agreement.is_stopping:
                return
            is_busy = agreement.is_busy
            if is_busy:
                self._step()
            elif self._rejected:
                self._send_outputs([], {})

    def _take_messages(self, timeout_s: float) -> bool:
        """Handle what came; True once the caller asked to stop (or is gone)."""
        while (message := self.inbox.get(timeout_s)) is not None:
            timeout_s = 0
            if isinstance(message, RankShutdown):
                return True
            if isinstance(message, RankAdd):
                self._add(message)
            elif isinstance(message, RankAbort):
                self.rank.engine.abort_requests(message.request_ids)
            elif not isinstance(message, RankWake):
                raise TypeError(f"unexpected message {message!r}")
        return False

    def _add(self, message: RankAdd) -> None:
        try:
            self.rank.engine.add_request(message.request_id, message.prompt_token_ids, message.sampling_params,
                                         prompt=message.prompt, stream=message.stream)
        except (RequestRejected, ValueError) as exc:
            self._rejected[message.request_id] = str(exc)

    def _step(self) -> None:
        failed: dict[str, str] = {}
        try:
            outputs = self.rank.step()
        except EngineStepError as exc:  # those requests are finished, their blocks freed
            outputs, failed = [], dict.fromkeys(exc.request_ids, repr(exc.cause))
        self._send_outputs(outputs, failed)

    def _send_outputs(self, outputs: list, failed: dict[str, str]) -> None:
        stats = self.rank.engine.get_stats()
        rejected, self._rejected = self._rejected, {}
        if outputs or failed or rejected:
            self.conn.send(RankStepOutputs(outputs, failed, rejected, stats.num_free_blocks, stats.num_running))


def serve_rank(conn: Connection, config: RankConfig) -> None:
    spec = EPGroupSpec(config.host, config.port, config.group_id, config.rank, config.engine.ep_size)
    try:
        rank = EPEngine(config.engine, spec)
    except Exception as exc:
        logger.exception("EP rank %d failed to start", config.rank)
        conn.send(RankFailed(f"EP rank {config.rank} failed to start: {exc!r}", []))
        return
    manager = rank.engine.kv_cache_manager
    conn.send(RankReady(_max_model_len(rank), manager.num_total_blocks))
    try:
        RankLoop(conn, rank).run()
    except EPPeerUnavailable as exc:
        request_ids = rank.fail_all()
        logger.error("EP rank %d lost its group: %s", config.rank, exc)
        conn.send(RankFailed(f"EP rank {config.rank} lost its group: {exc}", request_ids,
                             manager.num_free_blocks, manager.num_total_blocks))
    finally:
        rank.shutdown()


def _max_model_len(rank: EPEngine) -> int:
    manager = rank.engine.kv_cache_manager
    return min(rank.engine.max_model_len, manager.num_total_blocks * manager.block_size)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    config: RankConfig = conn.recv()
    torch.set_num_threads(config.torch_threads)
    serve_rank(conn, config)


if __name__ == "__main__":
    main(sys.argv[1:])
