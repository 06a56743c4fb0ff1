"""`build_app(args) -> Application`: the one place that turns classes into Serve deployments.

Usable as a Ray Serve `import_path` (`k2ray.serve.app:build_app`, `args` from the YAML's application
entry), from `k2ray serve`, and from tests. Graph: Router (FastAPI ingress) -> EngineServer pool.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from k2ray.serve.args import ServeArgs, load_serve_args
from k2ray.serve.engine.engine_server import EngineServer
from k2ray.serve.http.router import Router

ROUTER_DEPLOYMENT = "Router"
ENGINE_DEPLOYMENT = "EngineServer"


def build_app(args: ServeArgs | dict[str, Any] | None = None) -> Application:
    serve_args = load_serve_args(args)
    engine = serve.deployment(
        EngineServer,
        name=ENGINE_DEPLOYMENT,
        num_replicas=serve_args.engine.num_replicas,
        max_ongoing_requests=serve_args.engine.max_ongoing_requests,
        max_queued_requests=serve_args.engine.max_queued_requests,
        ray_actor_options={"num_cpus": serve_args.engine.num_cpus, "num_gpus": serve_args.engine.num_gpus,
                           **_runtime_env(serve_args.engine.env_vars)},
    ).bind(serve_args)
    return serve.deployment(
        Router,
        name=ROUTER_DEPLOYMENT,
        num_replicas=serve_args.router.num_replicas,
        max_ongoing_requests=serve_args.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": serve_args.router.num_cpus,
                           **_runtime_env(serve_args.router.env_vars)},
    ).bind(serve_args, engine)


def _runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
    return {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
