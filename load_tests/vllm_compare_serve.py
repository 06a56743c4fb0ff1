"""vllm_compare.py's serving half: vLLM's OpenAI server and `k2ray serve` on 127.0.0.1, one load client.

Both servers are started (one after the other, so neither's start-up compile slows the other's) and stay up;
the rounds then alternate between them with serve_bench's workload runner and HTTP sender (streamed
/v1/completions, token-id prompts, greedy, eos ignored), so drifting load on the box hits both alike. Each
server runs in its own process group; on the way out it gets SIGINT (its own shutdown), then SIGKILL, and
any process it started that is still alive is killed by PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psutil
import yaml
from bench_report import summarize  # sibling modules (run as a script)
from bench_senders import http_sender
from serve_bench import Workload, run_workload
from vllm_compare import k2ray_env, k2ray_python, round_order, vllm_env
from vllm_compare_offline import VLLM_ATTENTION_BACKEND

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 900.0  # vLLM compiles its model at every start: minutes on a loaded 2-core box
STOP_TIMEOUT_S = 60.0
POLL_S = 1.0
REQUEST_TIMEOUT_S = 300.0
PORTS = {"vllm": 8531, "k2ray": 8532}
SERVED_MODEL = "vllm-compare"
# Latency figures reported per engine (ms): the SLO fields of bench_report.summarize are not used here.
NO_SLO_MS = float("inf")
WARMUP = Workload([[7 + i] * 8 for i in range(4)], [4] * 4)


def k2ray_serve_config(checkpoint: Path, threads: int, port: int) -> dict:
    return {"model": str(checkpoint), "served_model_name": SERVED_MODEL, "host": LOOPBACK, "port": port,
            "direct_ingress": True, "ray_num_cpus": 4,
            "engine": {"num_cpus": 1, "torch_threads": threads, "max_num_seqs": 128, "max_num_batched_tokens": 2048,
                       "max_model_len": 1024, "kv_cache_memory_bytes": 1 << 30},
            "router": {"num_cpus": 0.5}}


def vllm_command(python: Path, checkpoint: Path, port: int) -> list[str]:
    # `vllm serve` itself is broken in this build (it looks up package metadata named `vllm`); this is its server.
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
            "--served-model-name", SERVED_MODEL, "--host", LOOPBACK, "--port", str(port), "--dtype", "float32",
            "--max-model-len", "1024", "--max-num-seqs", "128", "--max-num-batched-tokens", "2048", "--seed", "0",
            "--attention-backend", VLLM_ATTENTION_BACKEND]


@contextmanager
def server(command: list[str], env: dict[str, str], log: Path, url: str):
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    descendants: set[psutil.Process] = set()
    try:
        _wait_ready(proc, url, log)
        descendants |= set(psutil.Process(proc.pid).children(recursive=True))
        yield url
    finally:
        _stop(proc, descendants)


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode} before answering (log: {log})")
        try:
            if httpx.get(f"{url}/v1/models", timeout=POLL_S * 5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"{url} did not answer within {READY_TIMEOUT_S} s (log: {log})")


def _stop(proc: subprocess.Popen, descendants: set[psutil.Process]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for child in descendants:  # started in a session of their own (Ray's daemons), so not in the group
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


async def _bench(urls: dict[str, str], workload: Workload, args) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    pooled: dict[str, list] = {name: [] for name in urls}
    walls = dict.fromkeys(urls, 0.0)
    clients = {name: httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits)
               for name, url in urls.items()}
    try:
        sends = {name: http_sender(client, SERVED_MODEL, 0.0) for name, client in clients.items()}
        for send in sends.values():
            await run_workload(WARMUP, send, args.concurrency, float("inf"), args.seed)
        for round_index in range(args.serve_rounds):
            for name in round_order(list(urls), round_index):
                results, wall = await run_workload(workload, sends[name], args.concurrency, float("inf"), args.seed)
                pooled[name].extend(results)
                walls[name] += wall
                print(f"serving round {round_index} {name:<6} {sum(r.num_output_tokens for r in results) / wall:7.1f} "
                      f"output tok/s", flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
    report = {}
    for name in urls:
        summary = summarize(pooled[name], walls[name], NO_SLO_MS, NO_SLO_MS)
        report[name] = {k: summary[k] for k in ("num_requests", "num_ok", "errors", "output_tokens_per_s",
                                                "ttft_ms", "itl_ms", "tpot_ms")}
    report["ratio_output_tok_s"] = report["k2ray"]["output_tokens_per_s"] / report["vllm"]["output_tokens_per_s"]
    return report


def run_serving(args, checkpoint: Path, vllm_python: Path, workload: dict) -> dict:
    urls = {name: f"http://{LOOPBACK}:{port}" for name, port in PORTS.items()}
    config = args.log_dir / "k2ray-serve.yaml"
    config.write_text(yaml.safe_dump(k2ray_serve_config(checkpoint, args.serve_threads, PORTS["k2ray"])))
    k2ray_cli = [k2ray_python(), "-m", "k2ray.cli"]
    started = time.perf_counter()
    with ExitStack() as stack:
        vllm_process_env = vllm_env(args.vllm_venv, args.serve_threads, args.omp_wait_policy)
        stack.enter_context(server(vllm_command(vllm_python, checkpoint, PORTS["vllm"]), vllm_process_env,
                                   args.log_dir / "serve-vllm.log", urls["vllm"]))
        vllm_ready = time.perf_counter() - started
        stack.enter_context(server([*k2ray_cli, "serve", "--config", str(config)],
                                   k2ray_env(args.k2ray_src, args.omp_wait_policy), args.log_dir / "serve-k2ray.log",
                                   urls["k2ray"]))
        k2ray_ready = time.perf_counter() - started - vllm_ready
        report = asyncio.run(_bench(urls, Workload(workload["prompts"], workload["output_lens"]), args))
    report["ready_s"] = {"vllm": vllm_ready, "k2ray": k2ray_ready}
    report["concurrency"] = args.concurrency
    report["threads"] = args.serve_threads
    return report


def print_serving(report: dict) -> None:
    for name in ("k2ray", "vllm"):
        r = report[name]
        print(f"serving at {report['concurrency']} streams, {name:<6} {r['output_tokens_per_s']:7.1f} output tok/s, "
              f"TTFT p50 {r['ttft_ms']['p50']:.0f} / p99 {r['ttft_ms']['p99']:.0f} ms, "
              f"ITL p50 {r['itl_ms']['p50']:.1f} / p99 {r['itl_ms']['p99']:.1f} ms, {r['num_ok']}/{r['num_requests']} ok, "
              f"ready in {report['ready_s'][name]:.0f} s")
    print(f"serving: k2ray {report['ratio_output_tok_s']:.2f}x vLLM output tok/s")
