"""A prefill engine in its own process, driven over a pipe (the control path Ray calls take in
serving), pushing latent KV to the test process over a real KV pair.

`Gate` stands in for a slow network between chunks: the sender's reads of the cache go through
it, so a test can hold a transfer after its first chunk (and abort, or kill the process, there).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.dist.kv_pair_group import PairSpec
from k2ray.dist.kv_sender import KVSender
from k2ray.engine.config import EngineConfig
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.runner.model_runner import ModelRunner

GATE_OPEN, GATE_PAUSE = "open", "pause"
GATE_WAIT_S = 60.0


@dataclass(frozen=True)
class WorkerArgs:
    engine: EngineConfig
    spec: PairSpec
    transfer: KVTransferConfig


class Gate:
    """A ModelRunner's block store whose reads pause (until `release`) after `after_reads` reads."""

    def __init__(self, runner: ModelRunner, mode: str, after_reads: int, release: mp.Event) -> None:
        self.runner, self.mode, self.after_reads, self.release = runner, mode, after_reads, release
        self.device = runner.device
        self.kv_layout = runner.kv_layout
        self.num_reads = 0

    def read_kv_blocks(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == GATE_PAUSE and self.num_reads >= self.after_reads:
            self.release.wait(GATE_WAIT_S)
        self.num_reads += 1
        return self.runner.read_kv_blocks(block_ids, out)

    def write_kv_blocks(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        self.runner.write_kv_blocks(block_ids, kv)


def _prefill(engine: LLMEngine, request_id: str, prompt: list[int], params):
    engine.add_request(request_id, prompt, params)
    result = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                result = output.prefill_result
    return result


def serve(args: WorkerArgs, conn: Connection, release: mp.Event) -> None:
    engine = LLMEngine(args.engine)
    gate = Gate(engine.model_runner, GATE_OPEN, 0, release)
    sender = KVSender(gate, args.spec, args.transfer)
    futures = {}
    conn.send("ready")
    while True:
        command, *rest = conn.recv()
        if command == "prefill":
            reply = _prefill(engine, *rest)
        elif command == "read":
            reply = engine.model_runner.read_kv_blocks(rest[0])
        elif command == "send":
            meta, src_block_ids = rest
            futures[meta.request_id] = sender.send(meta, src_block_ids)
            reply = "queued"
        elif command == "sent":  # the send's outcome: its stats, or its error as text
            future = futures.pop(rest[0])
            error = future.exception(args.transfer.timeout_s * 2)
            reply = future.result() if error is None else f"{type(error).__name__}: {error}"
        elif command == "gate":
            gate.mode, gate.after_reads = rest
            gate.num_reads = 0
            reply = "ok"
        elif command == "cancel":
            reply = sender.cancel(rest[0])
        elif command == "release":
            reply = engine.release_prefilled(rest[0])
        elif command == "free_blocks":
            reply = (engine.kv_cache_manager.num_free_blocks, engine.kv_cache_manager.num_total_blocks)
        else:
            sender.close()
            conn.send("bye")
            return
        conn.send(reply)
