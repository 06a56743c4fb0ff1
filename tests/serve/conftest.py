"""One local Ray instance and one live k2ray app (real engine on the embedded tiny checkpoint) per session."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import httpx
import pytest

from k2ray.model.default_checkpoint import tiny_checkpoint_dir

E2E_ENGINE = {
    "num_cpus": 1, "torch_threads": 1, "block_size": 16, "max_num_seqs": 32, "max_num_batched_tokens": 1024,
    "max_model_len": 1024, "num_kv_blocks": 512, "enable_prefix_caching": True,
}
E2E_MAX_INFLIGHT = 24  # above the 16-stream test, low enough for the overload test to fill
HEALTH_TIMEOUT_S = 180.0
RAY_NUM_CPUS = 8  # logical: actors ask for fractions of it, the machine has 2 cores


@dataclass(frozen=True)
class LiveApp:
    base_url: str
    model: str
    max_model_len: int
    max_inflight: int
    engine: object  # DeploymentHandle to the engine pool

    async def engine_stats(self) -> dict[str, int]:
        return await self.engine.stats.remote()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_beside(live_app: LiveApp, args) -> str:
    """Run another app (its ServeArgs name it and its route prefix) on live_app's Serve instance; its base
    URL once it answers /health."""
    from ray import serve

    from k2ray.serve.app import build_app

    serve.run(build_app(args), name=args.app_name, route_prefix=args.route_prefix, blocking=False)
    base = live_app.base_url.rstrip("/") + args.route_prefix
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while httpx.get(f"{base}/health").status_code != 200:
        assert time.monotonic() < deadline, f"{args.app_name} never became healthy"
        time.sleep(0.2)
    return base


@pytest.fixture(scope="session")
def live_app():
    ray = pytest.importorskip("ray")
    from ray import serve

    from k2ray.serve.app import ENGINE_DEPLOYMENT
    from k2ray.serve.args import load_serve_args
    from k2ray.serve.launcher import init_local_ray, start_app

    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "port": _free_port(), "served_model_name": "k2-tiny",
        "engine": E2E_ENGINE,
        "router": {"num_cpus": 0.5, "max_inflight_requests": E2E_MAX_INFLIGHT},
        "testing": {"allow_injection": True},
    })
    owns_ray = not ray.is_initialized()  # one Ray per session, shared if another suite started it
    if owns_ray:
        init_local_ray(args, num_cpus=RAY_NUM_CPUS, log_to_driver=False)
    try:
        base = start_app(args)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline, "app never became healthy"
            time.sleep(0.2)
        yield LiveApp(base, args.model_name, E2E_ENGINE["max_model_len"], E2E_MAX_INFLIGHT,
                      serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=args.app_name))
    finally:
        serve.shutdown()
        if owns_ray:
            ray.shutdown()
