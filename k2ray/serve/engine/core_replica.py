"""CoreReplica: what every engine deployment's replica is, whatever its role: the owner of one engine
core process (started on construction, stopped with the replica), its health check, its stats and the
relay of those stats into Ray metrics (the core is a plain process, no Ray worker)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, fields
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from k2ray.engine.config import EngineConfig
from k2ray.engine.ep.ep_llm_engine import check_ep_size, free_port
from k2ray.serve.args import EngineArgs, ServeArgs
from k2ray.serve.engine.engine_core_client import EngineCoreClient, EngineCoreDied
from k2ray.serve.engine.engine_core_protocol import CoreConfig, CorePDConfig
from k2ray.serve.engine.ep_bundles import RankBundles
from k2ray.serve.engine.ep_core_group import (
    EP_CORE_COMMAND,
    RENDEZVOUS_HOST,
    EPCoreGroup,
    rank_configs,
)
from k2ray.serve.metrics.engine_metrics import EngineMetricsRelay, ExpertMetrics

LOCAL_REPLICA = "local"
POOL_OF_ROLE = {"both": "colocated", "prefill": "prefill", "decode": "decode"}


def engine_config(args: ServeArgs, engine: EngineArgs | None = None, role: str = "both") -> EngineConfig:
    """EngineConfig from ServeArgs.engine (or a pool's `engine`); None values keep the engine's defaults."""
    known = {f.name for f in fields(EngineConfig)}
    values = {k: v for k, v in (engine or args.engine).model_dump().items() if k in known and v is not None}
    return EngineConfig(model=args.model_dir, skip_tokenizer_init=True, role=role, **values)


def core_config(args: ServeArgs, engine: EngineArgs | None = None, role: str = "both",
                pd: CorePDConfig | None = None) -> CoreConfig:
    engine = engine or args.engine
    affinity = tuple(engine.cpu_affinity) if engine.cpu_affinity is not None else None
    return CoreConfig(engine_config(args, engine, role), engine.stream_interval, engine.torch_threads,
                      args.testing.allow_injection, pd, affinity)


def _start_cores(config: CoreConfig, startup_timeout_s: float,
                 bundles: RankBundles | None) -> EngineCoreClient | EPCoreGroup:
    """The replica's engine core, or with ep_size > 1 its group of rank cores (one handle either way),
    rank r's on bundle r's GPU when the replica holds its ranks' bundles."""
    if config.engine.ep_size == 1:
        return EngineCoreClient(config, startup_timeout_s)
    check_ep_size(config.engine.model, config.engine.ep_size)
    commands = bundles.core_commands(EP_CORE_COMMAND) if bundles is not None else None
    return EPCoreGroup(rank_configs(config, free_port(RENDEZVOUS_HOST)), startup_timeout_s, commands)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # built outside Serve (in-process use, tests)
        return LOCAL_REPLICA


class CoreReplica:
    def __init__(self, args: ServeArgs, engine: EngineArgs, role: str, pd: CorePDConfig | None = None) -> None:
        is_ep = engine.ep_size > 1
        self._bundles = RankBundles.lease(engine.ep_size, engine.num_cpus, engine.num_gpus) if is_ep else None
        config = core_config(args, engine, role, pd)
        try:
            self._core = _start_cores(config, engine.core_startup_timeout_s, self._bundles)
        except BaseException:
            if self._bundles is not None:
                self._bundles.release()
            raise
        self._replica_id = _replica_id()
        self._relay = EngineMetricsRelay(POOL_OF_ROLE[role], self._replica_id)
        self._expert_metrics = ExpertMetrics(POOL_OF_ROLE[role], self._replica_id)
        self._stats_interval_s = engine.stats_interval_s
        self._relay_task: asyncio.Task | None = None

    async def info(self) -> dict[str, int]:
        """Runtime facts the router needs (resolved once the engine is built)."""
        return {"max_model_len": self._core.max_model_len, "block_size": self._core.block_size}

    async def stats(self, pin: Any = None) -> dict[str, Any]:
        """This replica's engine stats, its core's pid and its replica id (`pin`, a ReplicaPin, names the
        replica to ask where the pool's request router honours it)."""
        bundles = [] if self._bundles is None else [asdict(grant) for grant in self._bundles.grants]
        return {**await self._core.stats(), "pid": self._core.pid, "pids": self._core.pids,
                "replica_id": self._replica_id, "rank_bundles": bundles}

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine core died is replaced. The first one starts
        the stats relay (a task needs the replica's event loop, which __init__ does not run on)."""
        if self._relay_task is None:
            self._relay_task = asyncio.get_running_loop().create_task(self._relay_stats())
        if not self._core.is_alive:
            raise EngineCoreDied("the engine core process is not running")

    async def _relay_stats(self) -> None:
        while self._core.is_alive:
            try:
                stats = await self._core.stats()
                self._relay.update(stats)
                self._expert_metrics.update(stats)
            except EngineCoreDied:
                return
            await asyncio.sleep(self._stats_interval_s)

    async def _abort(self, request_id: str) -> None:
        if self._core.is_alive:
            try:
                await self._core.abort(request_id)
            except EngineCoreDied:
                pass  # gone with its requests and their blocks

    def shutdown(self) -> None:
        """Stop the engine core. Serve calls it through __del__ when the replica goes."""
        task = getattr(self, "_relay_task", None)
        if task is not None:
            task.cancel()
        core = getattr(self, "_core", None)
        if core is not None:
            core.shutdown()
        bundles = getattr(self, "_bundles", None)
        if bundles is not None:
            bundles.release()

    def __del__(self) -> None:
        self.shutdown()
