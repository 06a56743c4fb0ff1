"""`build_app(args) -> Application`: the one place that turns classes into Serve deployments.

Usable as a Ray Serve `import_path` (`k2ray.serve.app:build_app`, `args` from the YAML's application
entry), from `k2ray serve`, and from tests. Graph, colocated (the default): Router (FastAPI ingress)
-> EngineServer pool. Disaggregated: Router -> DecodeServer pool -> PrefillServer pool, both pools
routed by KVAwareRequestRouter.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application, Deployment
from ray.serve.config import RequestRouterConfig

from k2ray.serve.args import EngineArgs, ServeArgs, load_serve_args
from k2ray.serve.engine.engine_server import EngineServer
from k2ray.serve.http.router import Router
from k2ray.serve.pd.decode_server import DecodeServer
from k2ray.serve.pd.kv_request_router import KVAwareRequestRouter
from k2ray.serve.pd.prefill_server import PrefillServer

ROUTER_DEPLOYMENT = "Router"
ENGINE_DEPLOYMENT = "EngineServer"
PREFILL_DEPLOYMENT = "PrefillServer"
DECODE_DEPLOYMENT = "DecodeServer"


def build_app(args: ServeArgs | dict[str, Any] | None = None) -> Application:
    serve_args = load_serve_args(args)
    if serve_args.disaggregated:
        prefill = _engine_deployment(PrefillServer, PREFILL_DEPLOYMENT, serve_args.pool_engine("prefill"),
                                     _kv_router(serve_args)).bind(serve_args)
        engine = _engine_deployment(DecodeServer, DECODE_DEPLOYMENT, serve_args.pool_engine("decode"),
                                    _kv_router(serve_args)).bind(serve_args, prefill)
    else:
        engine = _engine_deployment(EngineServer, ENGINE_DEPLOYMENT, serve_args.engine).bind(serve_args)
    return serve.deployment(
        Router,
        name=ROUTER_DEPLOYMENT,
        num_replicas=serve_args.router.num_replicas,
        max_ongoing_requests=serve_args.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": serve_args.router.num_cpus,
                           **_runtime_env(serve_args.router.env_vars)},
    ).bind(serve_args, engine)


def _engine_deployment(cls: type, name: str, engine: EngineArgs,
                       request_router: RequestRouterConfig | None = None) -> Deployment:
    return serve.deployment(
        cls,
        name=name,
        num_replicas=engine.num_replicas,
        max_ongoing_requests=engine.max_ongoing_requests,
        max_queued_requests=engine.max_queued_requests,
        ray_actor_options={"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus,
                           **({"resources": engine.resources} if engine.resources else {}),
                           **_runtime_env(engine.env_vars)},
        **({"request_router_config": request_router} if request_router is not None else {}),
        **_ep_placement(engine),
    )


def _ep_placement(engine: EngineArgs) -> dict[str, Any]:
    """An EP replica's ranks are processes of its own node: one bundle per rank (its CPUs, its GPU), packed
    on one node. The replica actor takes bundle 0 (rank 0's, with the pool's custom resources); each other
    bundle is held by a RankBundle actor and its rank's core runs on its GPU (engine/ep_bundles.py)."""
    if engine.ep_size == 1:
        return {}
    rank = {"CPU": engine.num_cpus, **({"GPU": engine.num_gpus} if engine.num_gpus else {})}
    return {"placement_group_bundles": [{**rank, **engine.resources}] + [rank] * (engine.ep_size - 1),
            "placement_group_strategy": "STRICT_PACK"}


def _kv_router(args: ServeArgs) -> RequestRouterConfig:
    return RequestRouterConfig(request_router_class=KVAwareRequestRouter,
                               request_routing_stats_period_s=args.pd.routing_stats_period_s)


def _runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
    return {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
