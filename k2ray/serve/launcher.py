"""`k2ray serve`: start a local Ray, run the app, print the URL, serve until SIGINT/SIGTERM, and shut
down everything it started (Serve, then Ray)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import ray
from ray import serve

from k2ray.serve.app import build_app
from k2ray.serve.args import ServeArgs, load_serve_args

# The main thread wakes this often to notice SIGINT even where waits are not interruptible.
STOP_POLL_S = 0.5
LOOPBACK = "127.0.0.1"


def init_local_ray(args: ServeArgs, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """A fresh single-node Ray for this process (never an existing cluster)."""
    ray.init(address="local", num_cpus=num_cpus or args.ray_num_cpus, include_dashboard=False,
             log_to_driver=log_to_driver,
             runtime_env={"env_vars": {**args.ray_env_vars, **args.ingress_env_vars}},
             _system_config={"worker_niceness": args.ray_worker_niceness})


def start_app(args: ServeArgs) -> str:
    """Deploy on the local Ray `init_local_ray` started and return the OpenAI base URL."""
    if args.router.channel_host is None:  # one machine: engines reach the routers over loopback
        router = args.router.model_copy(update={"channel_host": LOOPBACK})
        args = args.model_copy(update={"router": router})
    # With direct ingress the router replica owns `port`; Serve's proxy moves aside to `proxy_port`.
    proxy_port = args.proxy_port if args.direct_ingress else args.port
    serve.start(http_options={"host": args.host, "port": proxy_port})
    serve.run(build_app(args), name=args.app_name, route_prefix=args.route_prefix, blocking=False)
    prefix = args.route_prefix.rstrip("/")
    return f"http://{args.host}:{args.port}{prefix}"


def run_serve(model: str | None = None, config_path: str | Path | None = None, host: str | None = None,
              port: int | None = None) -> None:
    args = load_serve_args(config_path, model=model, host=host, port=port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    init_local_ray(args)
    try:
        base = start_app(args)
        print(f"k2ray: serving {args.model_name} at {base}/v1 (OpenAI) and {base}/v1/messages (Anthropic); "
              f"Ctrl-C to stop", flush=True)
        while not stop.wait(timeout=STOP_POLL_S):
            pass
    finally:
        print("k2ray: shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
