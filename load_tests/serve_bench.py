"""Serving benchmark: one workload through the OpenAI HTTP endpoint and through AsyncLLMEngine directly.

    python load_tests/serve_bench.py                          # starts a local app on the demo model
    python load_tests/serve_bench.py --url http://host:8000    # an already running app (HTTP path only)

The workload is token-id prompts (so both paths see identical tokens) with prompt/output lengths drawn
uniformly from ranges, a share of requests starting with a common prefix, and `ignore_eos` so every
request produces exactly its drawn output length. Requests run under a concurrency cap, optionally
paced by a Poisson request rate. Reports TTFT, ITL, TPOT, E2E (p50/p90/p99), output tokens/s, goodput
under a TTFT/TPOT SLO and errors as JSON, plus a PNG, and the HTTP path's overhead against the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from bench_report import (  # sibling module (run as a script)
    cpu_ms_per_token,
    cpu_seconds_by_process,
    plot_report,
    summarize,
)

# Every K2-format tokenizer starts with the 256 single-byte tokens: safe ids for a remote model.
BYTE_TOKENS = 256


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


def make_workload(args: argparse.Namespace, vocab_size: int, seed: int) -> Workload:
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(args.shared_prefix_len)]
    prompts, output_lens = [], []
    for _ in range(args.num_requests):
        n = rng.randint(*args.prompt_len)
        shared = rng.random() < args.shared_prefix_ratio
        head = prefix[: min(len(prefix), n - 1)] if shared else []
        prompts.append(head + [rng.randrange(vocab_size) for _ in range(n - len(head))])
        output_lens.append(rng.randint(*args.output_len))
    return Workload(prompts, output_lens)


async def run_workload(workload: Workload, send, concurrency: int, request_rate: float,
                       seed: int) -> tuple[list[RequestResult], float]:
    """Send every request under the concurrency cap (and a Poisson arrival rate if finite)."""
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async def one(i: int) -> RequestResult:
        async with limit:
            return await send(workload.prompts[i], workload.output_lens[i])

    start = time.perf_counter()
    tasks = []
    for i in range(len(workload.prompts)):
        tasks.append(asyncio.create_task(one(i)))
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def http_sender(client: httpx.AsyncClient, model: str, temperature: float):
    async def send(prompt: list[int], max_tokens: int) -> RequestResult:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        arrivals: list[float] = []
        num_tokens = 0
        try:
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    return RequestResult(False, error=f"HTTP {resp.status_code}")
                # SSE frames end at a blank line; split bytes ourselves (httpx's aiter_lines also
                # breaks on U+2028, U+0085 ... which random tokens put inside the JSON strings).
                buffer = b""
                async for data in resp.aiter_raw():
                    buffer += data
                    *frames, buffer = buffer.split(b"\n\n")
                    for frame in frames:
                        if not frame.startswith(b"data: {"):
                            continue
                        chunk = json.loads(frame[len(b"data: "):])
                        if "error" in chunk:
                            return RequestResult(False, error=chunk["error"].get("type"))
                        if chunk.get("usage"):
                            num_tokens = chunk["usage"]["completion_tokens"]
                        elif chunk["choices"]:
                            arrivals.append(time.perf_counter())
        except httpx.HTTPError as exc:
            return RequestResult(False, error=type(exc).__name__)
        return _result(start, arrivals, num_tokens)
    return send


def engine_sender(engine, temperature: float):
    from k2ray.sampling_params import SamplingParams

    counter = iter(range(1 << 62))

    async def send(prompt: list[int], max_tokens: int) -> RequestResult:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
        start = time.perf_counter()
        arrivals: list[float] = []
        num_tokens = 0
        try:
            async for out in engine.add_request(f"bench-{next(counter)}", prompt, params):
                if out.outputs[0].token_ids:
                    arrivals.append(time.perf_counter())
                    num_tokens += len(out.outputs[0].token_ids)
        except Exception as exc:
            return RequestResult(False, error=type(exc).__name__)
        return _result(start, arrivals, num_tokens)
    return send


def _result(start: float, arrivals: list[float], num_tokens: int) -> RequestResult:
    if not arrivals:
        return RequestResult(False, error="no output")
    return RequestResult(True, ttft_s=arrivals[0] - start, e2e_s=arrivals[-1] - start,
                         num_output_tokens=num_tokens, itl_s=list(np.diff(arrivals)))


async def bench_http(url: str, model: str, workload: Workload, args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        send = http_sender(client, model, args.temperature)
        await run_workload(_warmup(), send, args.concurrency, float("inf"), args.seed)
        results, wall = await run_workload(workload, send, args.concurrency, args.request_rate, args.seed)
    return summarize(results, wall, args.slo_ttft_ms, args.slo_tpot_ms)


def _new_engine(serve_args):
    import torch

    from k2ray.engine.async_engine import AsyncLLMEngine
    from k2ray.serve.engine_server import engine_config

    torch.set_num_threads(serve_args.engine.torch_threads)  # same budget as the engine replica
    return AsyncLLMEngine(engine_config(serve_args))


async def bench_both(url: str, serve_args, vocab_size: int, args: argparse.Namespace) -> dict:
    """Alternate HTTP and direct-engine rounds (each round a fresh workload, the same for both paths), so
    drifting background load on the machine hits both paths alike; results are pooled per path."""
    engine = _new_engine(serve_args)
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    runs: dict[str, list] = {"http": [], "engine": []}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
            senders = {"http": http_sender(client, serve_args.model_name, args.temperature),
                       "engine": engine_sender(engine, args.temperature)}
            for send in senders.values():
                await run_workload(_warmup(), send, args.concurrency, float("inf"), args.seed)
            cpu: dict[str, dict[str, float]] = {name: {} for name in senders}
            for round_index in range(args.rounds):
                workload = make_workload(args, vocab_size, seed=args.seed + round_index)
                for name, send in senders.items():
                    before = cpu_seconds_by_process(os.getpid())
                    runs[name].append(await run_workload(workload, send, args.concurrency, args.request_rate,
                                                         args.seed))
                    spent = cpu_ms_per_token(before, cpu_seconds_by_process(os.getpid()),
                                             sum(r.num_output_tokens for r in runs[name][-1][0]))
                    cpu[name] = {k: cpu[name].get(k, 0.0) + v / args.rounds for k, v in spent.items()}
    finally:
        engine.shutdown()
    report = {name: summarize([r for results, _ in rs for r in results], sum(wall for _, wall in rs),
                              args.slo_ttft_ms, args.slo_tpot_ms) for name, rs in runs.items()}
    for name in report:
        report[name]["cpu_ms_per_output_token"] = cpu[name]
    return report


def _warmup() -> Workload:
    # A few short requests with distinct tokens: first-call allocations, not the measured prefixes.
    return Workload([[7 + i] * 8 for i in range(4)], [4] * 4)


def _serve_and_bench(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from k2ray.api.tokenizer import K2Tokenizer
    from k2ray.serve.args import load_serve_args
    from k2ray.serve.launcher import init_local_ray, start_app

    serve_args = load_serve_args(args.config, port=args.port, ray_num_cpus=args.ray_num_cpus,
                                 direct_ingress=args.direct_ingress)
    if args.stream_interval is not None:
        engine = serve_args.engine.model_copy(update={"stream_interval": args.stream_interval})
        serve_args = serve_args.model_copy(update={"engine": engine})
    vocab_size = K2Tokenizer.from_pretrained(serve_args.model_dir).num_base_tokens
    init_local_ray(serve_args, log_to_driver=False)
    try:
        url = start_app(serve_args)
        _wait_healthy(url, args.timeout_s)
        return asyncio.run(bench_both(url, serve_args, vocab_size, args))
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s} s")


def overhead(report: dict) -> dict:
    http, engine = report["http"], report["engine"]
    return {
        "throughput_ratio": http["output_tokens_per_s"] / engine["output_tokens_per_s"],
        "ttft_p50_delta_ms": http["ttft_ms"]["p50"] - engine["ttft_ms"]["p50"],
        "tpot_p50_delta_ms": http["tpot_ms"]["p50"] - engine["tpot_ms"]["p50"],
    }


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="benchmark a running app (HTTP only); default: start one")
    p.add_argument("--model", default=None, help="model id for --url (default: the first of /v1/models)")
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "deploy/serve/local.yaml"))
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--ray-num-cpus", type=int, default=8)
    p.add_argument("--direct-ingress", action=argparse.BooleanOptionalAction, default=None,
                   help="override direct_ingress (HTTP served by the router replica, no proxy hop)")
    p.add_argument("--stream-interval", type=int, default=None, help="override engine.stream_interval")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: closed loop")
    p.add_argument("--num-requests", type=int, default=64, help="per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating HTTP / engine rounds")
    p.add_argument("--prompt-len", type=_range, default=(128, 384), help="MIN:MAX tokens")
    p.add_argument("--output-len", type=_range, default=(48, 96), help="MIN:MAX tokens")
    p.add_argument("--shared-prefix-ratio", type=float, default=0.5)
    p.add_argument("--shared-prefix-len", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/serve_bench.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.url:
        model = args.model or httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
        workload = make_workload(args, BYTE_TOKENS, args.seed)
        report = {"http": asyncio.run(bench_http(args.url, model, workload, args))}
    else:
        report = _serve_and_bench(args)
        report["overhead"] = overhead(report)
    report["workload"] = {k: v for k, v in vars(args).items() if k not in ("url", "out")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    plot_report(report, out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in report if k != "workload"}, indent=2, default=str))


if __name__ == "__main__":
    main()

