"""`k2ray serve`: start a local Ray, run the app, print one line with the URL once the app answers, serve
until SIGINT/SIGTERM, then shut down everything it started (the app, then Ray) and wait for each of its
processes to be gone."""

from __future__ import annotations

import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from k2ray.serve.app import build_app
from k2ray.serve.args import ServeArgs, load_serve_args

# The main thread wakes this often to notice SIGINT even where waits are not interruptible.
STOP_POLL_S = 0.5
LOOPBACK = "127.0.0.1"
HEALTH_POLL_S = 0.2
HEALTH_REQUEST_TIMEOUT_S = 5.0
# A first start on a small machine: Ray, the replicas, the engine core loading its checkpoint.
READY_TIMEOUT_S = 900.0
# After ray.shutdown the node's processes get this long to exit on their own, then SIGTERM, then SIGKILL.
PROCESS_EXIT_TIMEOUT_S = 10.0
PROCESS_TERMINATE_TIMEOUT_S = 5.0
PROCESS_POLL_S = 0.1
RAY_LOGS = "/tmp/ray/session_latest/logs"
SERVE_LOGGER = "ray.serve"


def init_local_ray(args: ServeArgs, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """A fresh single-node Ray for this process (never an existing cluster)."""
    ray.init(address="local", num_cpus=num_cpus or args.ray_num_cpus, include_dashboard=False,
             log_to_driver=log_to_driver, logging_level=args.log_level,
             runtime_env={"env_vars": {**args.ray_env_vars, **args.ingress_env_vars}},
             _system_config={"worker_niceness": args.ray_worker_niceness})


def start_app(args: ServeArgs) -> str:
    """Deploy on the local Ray `init_local_ray` started and return the app's base URL."""
    if args.router.channel_host is None:  # one machine: engines reach the routers over loopback
        router = args.router.model_copy(update={"channel_host": LOOPBACK})
        args = args.model_copy(update={"router": router})
    # With direct ingress the router replica owns `port`; Serve's proxy moves aside to `proxy_port`.
    proxy_port = args.proxy_port if args.direct_ingress else args.port
    logging_config = {"log_level": args.log_level}
    logging.getLogger(SERVE_LOGGER).setLevel(args.log_level)  # this process's Serve client ("... is ready")
    serve.start(http_options={"host": args.host, "port": proxy_port}, logging_config=logging_config)
    serve.run(build_app(args), name=args.app_name, route_prefix=args.route_prefix, blocking=False,
              logging_config=logging_config)
    prefix = args.route_prefix.rstrip("/")
    return f"http://{args.host}:{args.port}{prefix}"


def wait_until_serving(base: str, stop: threading.Event, timeout_s: float = READY_TIMEOUT_S) -> bool:
    """Poll `GET {base}/health` until 200 (True) or `stop` is set (False)."""
    deadline = time.monotonic() + timeout_s
    while not stop.wait(timeout=HEALTH_POLL_S):
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=HEALTH_REQUEST_TIMEOUT_S) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or still starting
        if time.monotonic() > deadline:
            raise RuntimeError(f"k2ray: {base}/health did not answer 200 within {timeout_s:.0f} s; "
                               f"Ray's logs are in {RAY_LOGS}")
    return False


def launch_args(model: str | None = None, config_path: str | Path | None = None, host: str | None = None,
                port: int | None = None, served_model_name: str | None = None) -> ServeArgs:
    """The config file's args with the command line's overrides; a served model name replaces its ids."""
    args = load_serve_args(config_path, model=model, host=host, port=port)
    if served_model_name is None:
        return args
    return load_serve_args({**args.model_dump(), "models": None, "served_model_name": served_model_name})


def run_serve(model: str | None = None, config_path: str | Path | None = None, host: str | None = None,
              port: int | None = None, served_model_name: str | None = None) -> None:
    args = launch_args(model, config_path, host, port, served_model_name)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    init_local_ray(args)
    processes = _descendants()
    try:
        base = start_app(args)
        if wait_until_serving(base, stop):
            model_ids = ", ".join(m.id for m in args.served_models)
            print(f"k2ray: serving {model_ids} at {base}/v1 (OpenAI) and {base}/v1/messages "
                  f"(Anthropic); Ctrl-C to stop", flush=True)
        while not stop.wait(timeout=STOP_POLL_S):
            pass
    finally:
        processes |= _descendants()  # the replicas and their engine core processes are up by now
        print("k2ray: shutting down", flush=True)
        _stop_app(args.app_name)
        ray.shutdown()
        _wait_for_exit(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_app(app_name: str) -> None:
    # Deleting the app stops its replicas gracefully; `serve.shutdown` would also ask the controller to
    # shut itself down, and Ray reports that self-kill as a failed task. ray.shutdown ends the rest.
    try:
        serve.delete(app_name)
    except RayServeException:
        pass  # Serve never started: nothing to stop


def _descendants() -> set[psutil.Process]:
    """Every process under this one: Ray's node (GCS, raylet, its agents, workers) and what they started.
    Recorded while they run, since the agents outlive the raylet that started them as orphans."""
    return set(psutil.Process().children(recursive=True))


def _alive(processes: set[psutil.Process]) -> set[psutil.Process]:
    alive = set()
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.add(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(processes: set[psutil.Process], timeout_s: float) -> set[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    alive = _alive(processes)
    while alive and time.monotonic() < deadline:
        time.sleep(PROCESS_POLL_S)
        alive = _alive(alive)
    return alive


def _wait_for_exit(processes: set[psutil.Process]) -> None:
    """Wait for each process to exit; escalate to SIGTERM, then SIGKILL, after bounded waits."""
    alive = _wait_gone(processes, PROCESS_EXIT_TIMEOUT_S)
    for escalate in (psutil.Process.terminate, psutil.Process.kill):
        for proc in alive:
            try:
                escalate(proc)
            except psutil.NoSuchProcess:
                pass
        alive = _wait_gone(alive, PROCESS_TERMINATE_TIMEOUT_S)
