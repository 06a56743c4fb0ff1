"""The engine replica's handle on an expert-parallel group of engine core processes, one per rank.

It stands where one EngineCoreClient stands (the replica's code does not tell them apart): each new request
goes to the least loaded rank (fewest requests in flight, then most free KV blocks at the last stats), in
every role, and every later message about it (abort, a P/D reservation, receive or send) to that same rank.
In P/D the KV moves between the prefill rank and the decode rank that hold the request: a prefill replica
names the rank that holds a prefill's KV (`core_id_of`, its core's P/D id, carried back to the decode side
in PrefillReply.source_id) and the decode rank pairs with that core. Each rank's core writes its
requests' deltas to the routers over the delta channel itself. The ranks start together (each blocks until
all have met); the group is alive while every rank is: one lost rank fails the replica's health check.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from k2ray.serve.engine.engine_core_client import CORE_COMMAND, EngineCoreClient
from k2ray.serve.engine.engine_core_protocol import CoreConfig, CoreEPConfig
from k2ray.serve.engine.engine_protocol import DeltaBuffer, EngineDelta, EngineFailure, EngineRequest
from k2ray.serve.pd.pd_protocol import CoreSendKV

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


def least_loaded_rank(num_requests: Sequence[int], num_free_blocks: Sequence[int]) -> int:
    """The rank with the fewest requests in flight, then the most free KV blocks, then the lowest index."""
    return min(range(len(num_requests)), key=lambda i: (num_requests[i], -num_free_blocks[i], i))


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
    def __init__(self, configs: list[CoreConfig], startup_timeout_s: float,
                 core_commands: Sequence[Sequence[str]] | None = None) -> None:
        """`core_commands`: rank r's core command (ep_bundles: on its bundle's GPU); None: EP_CORE_COMMAND."""
        commands = core_commands or [EP_CORE_COMMAND] * len(configs)
        with ThreadPoolExecutor(len(configs), "ep-core-start") as pool:
            futures = [pool.submit(EngineCoreClient, config, startup_timeout_s, command)
                       for config, command in zip(configs, commands, strict=True)]
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

    def core_id_of(self, request_id: str) -> str | None:
        """The P/D core id of the rank that holds `request_id` (None without P/D)."""
        index = self._owner.get(request_id)
        if index is None:
            raise KeyError(f"no rank of this replica holds {request_id!r}")
        return self._ranks[index].core_id_of(request_id)

    def _assign(self, request_id: str) -> EngineCoreClient:
        index = self._owner.get(request_id)
        if index is None:
            num_requests = [0] * len(self._ranks)
            for owner in self._owner.values():
                num_requests[owner] += 1
            index = self._owner[request_id] = least_loaded_rank(num_requests, self._num_free_blocks)
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
        request_id = _request_id(make_message(0))
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


def _drop_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # a rank that died meanwhile: its own health shows it
