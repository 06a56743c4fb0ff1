"""Disaggregated apps next to the session's colocated `live_app`, on the same Ray and Serve instance:
each under its own route prefix, with the same engine options as `live_app` so greedy outputs can be
compared across them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tests.serve.conftest import E2E_ENGINE, deploy_beside

PD_ENGINE = {**E2E_ENGINE, "num_cpus": 0.25}
LOOPBACK = "127.0.0.1"
# Small chunks, each read slowed down: a long prompt's transfer takes long enough to cut in mid-way.
SLOW_CHUNK_BYTES = 8 * 1024  # one block of the tiny layout per chunk
SLOW_CHUNK_DELAY_S = 0.15
STATS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PDApp:
    base_url: str
    model: str
    decode: object  # DeploymentHandle to the decode pool
    prefill: object  # ... and to the prefill pool

    async def stats(self, pool: str) -> dict[str, int]:
        return await (self.decode if pool == "decode" else self.prefill).stats.remote()

    async def replica_stats(self, pool: str) -> list[dict]:
        """Every live replica's stats, each asked by a call pinned to it; LookupError if a pin was
        answered elsewhere (a replica on its way out)."""
        from k2ray.serve.app import DECODE_DEPLOYMENT, PREFILL_DEPLOYMENT
        from k2ray.serve.pd.pd_protocol import ReplicaPin

        deployment, handle = (DECODE_DEPLOYMENT, self.decode) if pool == "decode" else (PREFILL_DEPLOYMENT,
                                                                                         self.prefill)
        ids = replica_ids(self.base_url.rsplit("/", 1)[-1], deployment)
        calls = [asyncio.wait_for(handle.stats.remote(ReplicaPin(i)), STATS_TIMEOUT_S) for i in ids]
        stats = list(await asyncio.gather(*calls))
        if [s["replica_id"] for s in stats] != ids:
            raise LookupError(f"asked {ids}, answered by {[s['replica_id'] for s in stats]}")
        return stats


def replica_ids(app_name: str, deployment: str) -> list[str]:
    """The live replicas of a deployment, from their actor names (`SERVE_REPLICA::app#deployment#id`)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return [a["name"].removeprefix(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def deploy_pd(live_app, name: str, num_prefill: int, num_decode: int, pd: dict, testing: dict | None = None) -> PDApp:
    from ray import serve

    from k2ray.model.default_checkpoint import tiny_checkpoint_dir
    from k2ray.serve.app import DECODE_DEPLOYMENT, PREFILL_DEPLOYMENT
    from k2ray.serve.args import load_serve_args

    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "app_name": name, "route_prefix": f"/{name}",
        "served_model_name": live_app.model, "engine": PD_ENGINE,
        "disaggregated": True, "prefill": {"num_replicas": num_prefill}, "decode": {"num_replicas": num_decode},
        "pd": {"kv_host": LOOPBACK, "routing_stats_period_s": 0.2, **pd},
        "router": {"num_cpus": 0.25, "channel_host": LOOPBACK},
        "testing": {"allow_injection": True, **(testing or {})},
    })
    base = deploy_beside(live_app, args)
    return PDApp(base, live_app.model, serve.get_deployment_handle(DECODE_DEPLOYMENT, app_name=name),
                 serve.get_deployment_handle(PREFILL_DEPLOYMENT, app_name=name))


def _undeploy(name: str) -> None:
    from ray import serve

    serve.delete(name)


@pytest.fixture(scope="session")
def reference_llm():
    from k2ray.engine.llm import LLM
    from k2ray.model.default_checkpoint import tiny_checkpoint_dir

    config = {k: v for k, v in E2E_ENGINE.items() if k not in ("num_cpus", "torch_threads")}
    return LLM(tiny_checkpoint_dir(), **config)


@pytest.fixture(scope="session")
def pd_app(live_app):
    """1 prefill + 1 decode, every prompt prefilled remotely."""
    yield deploy_pd(live_app, "pd1x1", 1, 1, {"local_prefill_threshold": 0})
    _undeploy("pd1x1")


@pytest.fixture(scope="session")
def pd_local_app(live_app):
    """1 + 1 with conditional disaggregation: misses under 48 tokens are prefilled by the decode replica."""
    yield deploy_pd(live_app, "pdlocal", 1, 1, {"local_prefill_threshold": 48})
    _undeploy("pdlocal")


@pytest.fixture(scope="session")
def pd_2x2_app(live_app):
    """2 prefill + 2 decode with slow KV sends (fault tests cut in mid-transfer), one retry."""
    yield deploy_pd(live_app, "pd2x2", 2, 2,
                    {"local_prefill_threshold": 0, "prefill_retries": 1, "prefill_timeout_s": 3.0,
                     "kv_transfer_timeout_s": 5.0, "kv_max_chunk_bytes": SLOW_CHUNK_BYTES},
                    {"kv_send_chunk_delay_s": SLOW_CHUNK_DELAY_S})
    _undeploy("pd2x2")
