"""EPLLMEngine: an offline engine that is an expert-parallel group of `ep_size` rank processes.

Each rank (k2ray/dist/ep_rank_process.py) is a whole LLMEngine over its own requests and KV cache, holding
n_routed_experts / ep_size of every MoE layer's experts; the ranks step in lockstep among themselves. This
side only routes: each new request goes to the least loaded rank (fewest requests, then most free blocks),
and `step` returns whatever outputs the ranks sent since. A rank that fails or exits fails the engine
(EngineError) within the group's time-out; its surviving ranks end their requests and exit too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.engine.config import EngineConfig
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
from k2ray.engine.errors import EngineError, EngineStepError
from k2ray.engine.outputs import RequestOutput
from k2ray.engine.scheduler import RequestRejected
from k2ray.model.args import ModelArgs
from k2ray.sampling_params import SamplingParams

# The rank processes run k2ray.dist's lockstep loop; the engine layer names it, never imports it.
RANK_COMMAND = (sys.executable, "-m", "k2ray.dist.ep_rank_process")  # + the fd of the rank's socket end
RENDEZVOUS_HOST = "127.0.0.1"
# How long a step waits for any rank's outputs before it checks the ranks are still running.
STEP_POLL_S = 1.0
SHUTDOWN_TIMEOUT_S = 10.0
# How long the ranks may take to load their experts and meet.
DEFAULT_STARTUP_TIMEOUT_S = 1800.0


@dataclass(eq=False)
class _Rank:
    index: int
    process: subprocess.Popen
    conn: Connection
    num_free_blocks: int = 0
    request_ids: set[str] = field(default_factory=set)


def check_ep_size(checkpoint: str, ep_size: int) -> None:
    """A clear error before any rank starts: the routed experts must shard evenly."""
    num_experts = ModelArgs.from_checkpoint(checkpoint).n_routed_experts
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the checkpoint's n_routed_experts={num_experts}")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EPLLMEngine:
    """The part of LLMEngine's interface `LLM` uses, over `config.ep_size` rank processes."""

    def __init__(self, config: EngineConfig, torch_threads: int = 1, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
                 rank_command: Sequence[str] = RANK_COMMAND) -> None:
        check_ep_size(config.model, config.ep_size)
        self.config = config
        self.tokenizer = None if config.skip_tokenizer_init else K2Tokenizer.from_pretrained(config.model)
        port, group_id = free_port(RENDEZVOUS_HOST), uuid.uuid4().hex
        self._ranks: list[_Rank] = []
        try:
            for index in range(config.ep_size):
                self._ranks.append(self._start_rank(rank_command, RankConfig(
                    config, RENDEZVOUS_HOST, port, group_id, index, torch_threads)))
            ready = [self._wait_ready(rank, startup_timeout_s) for rank in self._ranks]
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = min(r.max_model_len for r in ready)
        for rank, answer in zip(self._ranks, ready, strict=True):
            rank.num_free_blocks = answer.num_total_blocks
        self._owner: dict[str, _Rank] = {}
        self._woken: set[_Rank] = set()
        self.rank_failures: list[RankFailed] = []  # what failed ranks reported, for the caller's logs and tests

    @staticmethod
    def _start_rank(command: Sequence[str], rank_config: RankConfig) -> _Rank:
        ours, theirs = socket.socketpair()
        process = subprocess.Popen([*command, str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(rank_config)
        return _Rank(rank_config.rank, process, conn)

    @staticmethod
    def _wait_ready(rank: _Rank, timeout_s: float) -> RankReady:
        deadline = time.monotonic() + timeout_s
        while not rank.conn.poll(STEP_POLL_S):
            if (code := rank.process.poll()) is not None:
                raise EngineError(f"EP rank {rank.index} exited with code {code} before it was ready")
            if time.monotonic() >= deadline:
                raise EngineError(f"EP rank {rank.index} was not ready within {timeout_s:g} s")
        answer = rank.conn.recv()
        if isinstance(answer, RankFailed):
            raise EngineError(answer.message)
        return answer

    # ---- LLMEngine's interface, as LLM uses it ----

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    prompt: str | None = None, stream: bool = False) -> None:
        if sampling_params.n != 1:
            raise ValueError("engine requests are single-sequence; fan out n > 1 before add_request")
        if request_id in self._owner:
            raise ValueError(f"request {request_id!r} is already running")
        rank = min(self._ranks, key=lambda r: (len(r.request_ids), -r.num_free_blocks, r.index))
        self._send(rank, RankAdd(request_id, list(prompt_token_ids), sampling_params, prompt, stream))
        rank.request_ids.add(request_id)
        self._owner[request_id] = rank
        self._woken.add(rank)

    def abort_requests(self, request_ids: list[str]) -> None:
        by_rank: dict[_Rank, list[str]] = {}
        for request_id in request_ids:
            if (rank := self._owner.pop(request_id, None)) is not None:
                rank.request_ids.discard(request_id)
                by_rank.setdefault(rank, []).append(request_id)
        for rank, ids in by_rank.items():
            self._send(rank, RankAbort(ids), check=False)

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    def step(self) -> list[RequestOutput]:
        """Outputs the ranks sent (waits up to STEP_POLL_S for the first). Raises EngineError (the failed
        requests' ids in EngineStepError) when a rank failed requests, or lost its group."""
        self._wake_idle_ranks()
        outputs: list[RequestOutput] = []
        for conn in wait([rank.conn for rank in self._ranks], STEP_POLL_S):
            rank = next(r for r in self._ranks if r.conn is conn)
            try:
                message = conn.recv()
            except (EOFError, OSError):
                raise self._lost(rank, f"EP rank {rank.index} exited") from None
            outputs.extend(self._take(rank, message))
        for rank in self._ranks:
            if (code := rank.process.poll()) is not None and not rank.conn.poll():
                raise self._lost(rank, f"EP rank {rank.index} exited with code {code}")
        return outputs

    def rank_of(self, request_id: str) -> int | None:
        """The rank running the request (None once it is over)."""
        rank = self._owner.get(request_id)
        return None if rank is None else rank.index

    @property
    def pids(self) -> list[int]:
        return [rank.process.pid for rank in self._ranks]

    def shutdown(self) -> None:
        for rank in self._ranks:
            self._send(rank, RankShutdown(), check=False)
        for rank in self._ranks:
            try:
                rank.process.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rank.process.kill()
                rank.process.wait()
            rank.conn.close()
        self._ranks = []

    def __del__(self) -> None:
        if getattr(self, "_ranks", None):
            self.shutdown()

    # ---- internals ----

    def _take(self, rank: _Rank, message: object) -> list[RequestOutput]:
        if isinstance(message, RankFailed):
            self.rank_failures.append(message)
            raise self._lost(rank, message.message)
        if not isinstance(message, RankStepOutputs):
            raise EngineError(f"EP rank {rank.index} sent {type(message).__name__}")
        rank.num_free_blocks = message.num_free_blocks
        for output in message.outputs:
            if output.finished:
                self._forget(output.request_id)
        if message.rejected:
            request_id, reason = next(iter(message.rejected.items()))
            for rejected_id in message.rejected:
                self._forget(rejected_id)
            raise RequestRejected(f"request {request_id!r}: {reason}")
        if message.failed:
            for failed_id in message.failed:
                self._forget(failed_id)
            raise EngineStepError(list(message.failed), EngineError(next(iter(message.failed.values()))))
        return message.outputs

    def _forget(self, request_id: str) -> None:
        if (rank := self._owner.pop(request_id, None)) is not None:
            rank.request_ids.discard(request_id)

    def _lost(self, rank: _Rank, message: str) -> EngineError:
        """The group is gone with one rank: every request fails."""
        request_ids = list(self._owner)
        self._owner.clear()
        for each in self._ranks:
            each.request_ids.clear()
        return EngineStepError(request_ids, EngineError(message), f"EP group failed: {message}")

    def _wake_idle_ranks(self) -> None:
        """Requests went to some ranks: the others must join the next step now, not after their idle wait."""
        if self._woken:
            for rank in self._ranks:
                if rank not in self._woken:
                    self._send(rank, RankWake(), check=False)
            self._woken.clear()

    @staticmethod
    def _send(rank: _Rank, message: object, check: bool = True) -> None:
        try:
            rank.conn.send(message)
        except OSError:
            if check:
                raise EngineError(f"EP rank {rank.index} is gone") from None
