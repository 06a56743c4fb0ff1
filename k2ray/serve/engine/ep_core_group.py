"""The engine replica's handle on an expert-parallel group of engine core processes, one per rank.

It stands where one EngineCoreClient stands (the replica's code does not tell them apart): each new request
goes to the least loaded rank (fewest requests in flight, then most free KV blocks at the last stats) and
every later message about it (abort, a P/D reservation, receive or send) to that same rank, so in P/D the
KV moves between the prefill rank and the decode rank that hold the request. Each rank's core writes its
requests' deltas to the routers over the delta channel itself. The ranks start together (each blocks until
all have met); the group is alive while every rank is: one lost rank fails the replica's health check.
"""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from k2ray.serve.engine.engine_core_client import CORE_COMMAND, EngineCoreClient
from k2ray.serve.engine.engine_core_protocol import CoreConfig, CoreEPConfig
from k2ray.serve.engine.engine_protocol import DeltaBuffer, EngineDelta, EngineFailure, EngineRequest
from k2ray.serve.pd.pd_protocol import CoreExpect, CoreSendKV

EP_CORE_COMMAND = (*CORE_COMMAND[:2], "k2ray.serve.engine.ep_core")
RENDEZVOUS_HOST = "127.0.0.1"  # the ranks are processes of the replica's own node


def rank_configs(config: CoreConfig, port: int) -> list[CoreConfig]:
    """One CoreConfig per rank of `config.engine.ep_size`, meeting at RENDEZVOUS_HOST:port."""
    group_id = uuid.uuid4().hex
    configs = []
    for rank in range(config.engine.ep_size):
        pd = None if config.pd is None else replace(config.pd, core_id=f"{config.pd.core_id}-rank{rank}")
        configs.append(replace(config, pd=pd, ep=CoreEPConfig(RENDEZVOUS_HOST, port, group_id, rank)))
    return configs


def prefill_rank_of(request_id: str, prefill_ep_size: int) -> int:
    """The prefill rank of a request, known to both pools without asking: a KV pair joins one decode rank to
    one prefill rank, so the decode rank must name the prefill rank that will send (CoreExpect.source_id)."""
    return zlib.crc32(request_id.encode()) % prefill_ep_size


def prefill_source_id(source_id: str, request_id: str, prefill_ep_size: int) -> str:
    """The core id of the prefill rank that sends a request's KV: a prefill replica without EP runs one core
    under the replica's id; an EP one names its ranks' cores `ID-rankR` (rank_configs)."""
    if prefill_ep_size == 1:
        return source_id
    return f"{source_id}-rank{prefill_rank_of(request_id, prefill_ep_size)}"


def _request_id(message: object) -> str | None:
    add = getattr(message, "add", None)  # a decode reservation carries its CoreAdd
    return add.request_id if add is not None else getattr(message, "request_id", None)


class _RankStream:
    """A rank's DeltaBuffer that releases the request from the group once its final delta is taken."""

    def __init__(self, buffer: DeltaBuffer, release: Callable[[], None]) -> None:
        self._buffer = buffer
        self._release = release

    async def take(self) -> EngineDelta | None:
        delta = await self._buffer.take()
        if delta is None or delta.finished:
            self._release()
        return delta


class EPCoreGroup:
    def __init__(self, configs: list[CoreConfig], startup_timeout_s: float, prefill_ep_size: int = 1,
                 core_command: tuple[str, ...] = EP_CORE_COMMAND) -> None:
        """`prefill_ep_size`: a decode group's prefill pool ranks per replica."""
        self._is_prefill = configs[0].engine.role == "prefill"
        self._prefill_ep_size = prefill_ep_size
        with ThreadPoolExecutor(len(configs), "ep-core-start") as pool:
            futures = [pool.submit(EngineCoreClient, config, startup_timeout_s, core_command) for config in configs]
        errors = [f.exception() for f in futures if f.exception() is not None]
        self._ranks = [f.result() for f in futures if f.exception() is None]
        if errors:
            self.shutdown()
            raise errors[0]
        self.max_model_len = min(rank.max_model_len for rank in self._ranks)
        self.block_size = self._ranks[0].block_size
        self._owner: dict[str, int] = {}  # request -> rank index
        self._num_free_blocks = [0] * len(self._ranks)

    @property
    def pid(self) -> int:
        return self._ranks[0].pid

    @property
    def pids(self) -> list[int]:
        return [rank.pid for rank in self._ranks]

    @property
    def is_alive(self) -> bool:
        return all(rank.is_alive for rank in self._ranks)

    def rank_of(self, request_id: str) -> int | None:
        return self._owner.get(request_id)

    def _assign(self, request_id: str) -> EngineCoreClient:
        index = self._owner.get(request_id)
        if index is None and self._is_prefill:
            index = self._owner[request_id] = prefill_rank_of(request_id, len(self._ranks))
            self._wake_others(index)
        elif index is None:
            loads = [0] * len(self._ranks)
            for owner in self._owner.values():
                loads[owner] += 1
            index = min(range(len(self._ranks)), key=lambda i: (loads[i], -self._num_free_blocks[i], i))
            self._owner[request_id] = index
            self._wake_others(index)
        return self._ranks[index]

    def _wake_others(self, index: int) -> None:
        """The other ranks must join the next step at once, not after their idle wait: a stats query wakes
        a core's loop (its answer is dropped)."""
        for other, rank in enumerate(self._ranks):
            if other != index and rank.is_alive:
                asyncio.ensure_future(rank.stats()).add_done_callback(_drop_result)

    def _release(self, request_id: str) -> None:
        self._owner.pop(request_id, None)

    async def run_on_channel(self, request: EngineRequest) -> None:
        await self._assign(request.request_id).run_on_channel(request)
        self._release(request.request_id)

    def track(self, request_id: str) -> asyncio.Future[None]:
        done = self._assign(request_id).track(request_id)
        done.add_done_callback(lambda f: f.cancelled() or f.exception() or self._release(request_id))
        return done

    def stream(self, request: EngineRequest) -> _RankStream:
        buffer = self._assign(request.request_id).stream(request)
        return _RankStream(buffer, lambda: self._release(request.request_id))

    def forget(self, request_id: str) -> None:
        if (index := self._owner.get(request_id)) is not None:
            self._ranks[index].forget(request_id)

    async def abort(self, request_id: str, failure: EngineFailure | None = None) -> None:
        index = self._owner.pop(request_id, None)
        ranks = self._ranks if index is None else [self._ranks[index]]
        await asyncio.gather(*(rank.abort(request_id, failure) for rank in ranks if rank.is_alive))

    async def ask(self, make_message: Callable[[int], object]) -> Any:
        """A message about one request goes to its rank (a new one to the least loaded); one about none
        (cached block hashes) to every rank, list answers joined."""
        probe = make_message(0)
        request_id = _request_id(probe)
        if isinstance(probe, CoreExpect):  # the KV comes from one rank of the prefill replica: its own pair
            source_id = prefill_source_id(probe.source_id, probe.request_id, self._prefill_ep_size)
            make_message = _with_source(make_message, source_id)
        if request_id is None:
            answers = await asyncio.gather(*(rank.ask(make_message) for rank in self._ranks))
            return [item for answer in answers for item in answer] if isinstance(answers[0], list) else answers[0]
        answer = await self._assign(request_id).ask(make_message)
        if isinstance(make_message(0), CoreSendKV) or getattr(answer, "result", True) is None:
            self._release(request_id)  # the prefill side is done with it: sent, or refused
        return answer

    async def stats(self) -> dict[str, Any]:
        """The ranks' stats summed (`num_free_blocks` of the group, ...), each rank's under `ranks`."""
        per_rank = await asyncio.gather(*(rank.stats() for rank in self._ranks))
        self._num_free_blocks = [stats["num_free_blocks"] for stats in per_rank]
        total = {key: sum(stats[key] for stats in per_rank) for key, value in per_rank[0].items()
                 if isinstance(value, int | float)}
        return {**total, "ep_size": len(self._ranks), "ranks": per_rank}

    def shutdown(self) -> None:
        for rank in self._ranks:
            rank.shutdown()


def _with_source(make_message: Callable[[int], CoreExpect], source_id: str) -> Callable[[int], CoreExpect]:
    return lambda ack_id: replace(make_message(ack_id), source_id=source_id)


def _drop_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # a rank that died meanwhile: its own health shows it
