"""Expert-parallel apps next to the session's colocated `live_app`, on the same Ray and Serve instance, each
under its own route prefix with live_app's engine options (so greedy outputs compare across them)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.serve.conftest import E2E_ENGINE, deploy_beside

EP_SIZE = 2
EP_ENGINE = {**E2E_ENGINE, "num_cpus": 0.25, "ep_size": EP_SIZE, "ep_timeout_s": 60.0}
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class EPApp:
    base_url: str
    model: str
    engine: object  # DeploymentHandle to the (colocated or decode) engine pool

    async def stats(self) -> dict:
        return await self.engine.stats.remote()


def deploy(live_app, name: str, overrides: dict) -> EPApp:
    from ray import serve

    from k2ray.model.default_checkpoint import tiny_checkpoint_dir
    from k2ray.serve.app import DECODE_DEPLOYMENT, ENGINE_DEPLOYMENT
    from k2ray.serve.args import load_serve_args

    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "app_name": name, "route_prefix": f"/{name}",
        "served_model_name": live_app.model, "engine": EP_ENGINE,
        "router": {"num_cpus": 0.25, "channel_host": LOOPBACK}, **overrides,
    })
    base = deploy_beside(live_app, args)
    pool = DECODE_DEPLOYMENT if args.disaggregated else ENGINE_DEPLOYMENT
    return EPApp(base, live_app.model, serve.get_deployment_handle(pool, app_name=name))


@pytest.fixture(scope="session")
def ep_app(live_app):
    """The colocated app, one replica of EP_SIZE ranks."""
    from ray import serve

    yield deploy(live_app, "ep2", {})
    serve.delete("ep2")


@pytest.fixture(scope="session")
def pd_ep_app(live_app):
    """Disaggregated, EP_SIZE ranks in each pool's replica, every prompt prefilled remotely."""
    from ray import serve

    yield deploy(live_app, "pdep", {"disaggregated": True, "pd": {"kv_host": LOOPBACK, "local_prefill_threshold": 0,
                                                                 "routing_stats_period_s": 0.2}})
    serve.delete("pdep")


@pytest.fixture(scope="session")
def reference_llm():
    from k2ray.engine.llm import LLM
    from k2ray.model.default_checkpoint import tiny_checkpoint_dir

    config = {k: v for k, v in E2E_ENGINE.items() if k not in ("num_cpus", "torch_threads")}
    return LLM(tiny_checkpoint_dir(), **config)
