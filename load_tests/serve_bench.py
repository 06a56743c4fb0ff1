"""Serving benchmark: one workload through the OpenAI HTTP endpoint and through engine baselines.

    python load_tests/serve_bench.py                          # starts a local app on the demo model
    python load_tests/serve_bench.py --baselines core,inprocess   # the old baseline too, same run
    python load_tests/serve_bench.py --url http://host:8000    # an already running app (HTTP path only)
    python load_tests/serve_bench.py --variants --max-num-seqs 8 --concurrency 32   # Standard vs Turbo
    python load_tests/serve_bench.py --tools                  # tools declared vs none, one run

The workload is token-id prompts (so every path sees identical tokens) with prompt/output lengths drawn
uniformly from ranges, a share of requests starting with a common prefix, and `ignore_eos` so every
request produces exactly its drawn output length. Requests run under a concurrency cap, optionally
paced by a Poisson request rate. Reports TTFT, ITL, TPOT, E2E (p50/p90/p99), output tokens/s, goodput
under a TTFT/TPOT SLO and errors as JSON, plus a PNG, and the HTTP path's overhead against each
baseline (bench_senders.py): `core`, an engine core process of the bench's own driven over the delta
channel (the HTTP path alone), and `inprocess`, AsyncLLMEngine in the bench process (the old baseline).

`--variants`: HTTP only, the requests spread evenly over the served model ids (Standard and Turbo by
default: half on each) in one closed loop on the same engines, reported per id. Saturate the engines
(concurrency above `engine.max_num_seqs`) so requests queue and the variants' priorities decide who waits.

`--tools`: HTTP chat only, thinking off, rounds alternating four paths on the same engines: no tools;
response_format json_object (every decode step constrained, the same prompt: constrained vs
unconstrained steps); tools declared with tool_choice auto (every step under the tool-call grammar, the
prompt longer by the declarations); tool_choice required (a request ends when its call closes). Reports
each path and its throughput and p50 TPOT against the no-tools path (`tools_cost`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_report import (  # sibling modules (run as a script)
    against_baseline,
    cpu_ms_per_token,
    cpu_seconds_by_process,
    plot_report,
    summarize,
)
from bench_senders import BASELINES, RequestResult, chat_sender, http_sender

# --tools: path name -> its constraint (bench_senders.chat_sender; None: none); the first is the baseline.
TOOL_PATHS = {"no_tools": None, "json_object": "json_object", "tools_auto": "auto", "tools_required": "required"}
# Every K2-format tokenizer starts with the 256 single-byte tokens: safe ids for a remote model.
BYTE_TOKENS = 256


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


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
    """Send every request under the concurrency cap (and a Poisson arrival rate if finite). `send` may be
    a list of senders: request i goes through `send[i % len(send)]`. Results come back in request order."""
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    sends = send if isinstance(send, list) else [send]

    async def one(i: int) -> RequestResult:
        async with limit:
            return await sends[i % len(sends)](workload.prompts[i], workload.output_lens[i])

    start = time.perf_counter()
    tasks = []
    for i in range(len(workload.prompts)):
        tasks.append(asyncio.create_task(one(i)))
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


async def bench_http(url: str, model: str, workload: Workload, args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        send = http_sender(client, model, args.temperature)
        await run_workload(_warmup(), send, args.concurrency, float("inf"), args.seed)
        results, wall = await run_workload(workload, send, args.concurrency, args.request_rate, args.seed)
    return summarize(results, wall, args.slo_ttft_ms, args.slo_tpot_ms)


async def bench_variants(url: str, model_ids: list[str], vocab_size: int, args: argparse.Namespace) -> dict:
    """Request i goes to model_ids[i % len]: the variants share one closed loop and the same engines, and each
    id's requests are pooled over the rounds into its own summary (TTFT, TPOT ... p50/p90/p99)."""
    if len(model_ids) < 2:
        raise SystemExit(f"--variants needs at least two served model ids, got {model_ids}")
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    pooled: dict[str, list[RequestResult]] = {model: [] for model in model_ids}
    wall = 0.0
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        sends = [http_sender(client, model, args.temperature) for model in model_ids]
        await run_workload(_warmup(), sends, args.concurrency, float("inf"), args.seed)
        for round_index in range(args.rounds):
            workload = make_workload(args, vocab_size, seed=args.seed + round_index)
            results, spent = await run_workload(workload, sends, args.concurrency, args.request_rate, args.seed)
            wall += spent
            for i, result in enumerate(results):
                pooled[model_ids[i % len(model_ids)]].append(result)
    report = {}
    for model, results in pooled.items():
        report[model] = summarize(results, wall, args.slo_ttft_ms, args.slo_tpot_ms)
        del report[model]["_raw"]
    return report


async def bench_tools(url: str, model: str, vocab_size: int, args: argparse.Namespace) -> dict:
    """The TOOL_PATHS in alternating rounds on the same engines, each against the no-tools path."""
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        senders = {name: chat_sender(client, model, args.temperature, choice) for name, choice in TOOL_PATHS.items()}
        report = await _alternate(senders, vocab_size, args)
    for path in report.values():
        del path["_raw"]
    return {"tools": report, "tools_cost": against_baseline(report, next(iter(TOOL_PATHS)))}


async def bench_all(url: str, serve_args, vocab_size: int, args: argparse.Namespace) -> dict:
    """Alternate HTTP and baseline rounds (each round a fresh workload, the same for every path, the paths'
    order rotated), so drifting background load on the machine hits every path alike; results are pooled
    per path."""
    baselines = {}
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    try:
        for name in args.baselines:
            baselines[name] = BASELINES[name](serve_args, args.temperature)
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
            senders = {"http": http_sender(client, serve_args.model_name, args.temperature)}
            senders.update({name: baseline.send for name, baseline in baselines.items()})
            return await _alternate(senders, vocab_size, args)
    finally:
        for baseline in baselines.values():
            await baseline.close()


async def _alternate(senders: dict, vocab_size: int, args: argparse.Namespace) -> dict:
    for send in senders.values():
        await run_workload(_warmup(), send, args.concurrency, float("inf"), args.seed)
    runs: dict[str, list] = {name: [] for name in senders}
    cpu: dict[str, dict[str, float]] = {name: {} for name in senders}
    for round_index in range(args.rounds):
        workload = make_workload(args, vocab_size, seed=args.seed + round_index)
        names = list(senders)
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:  # rotate the order
            send = senders[name]
            before = cpu_seconds_by_process(os.getpid())
            run = await run_workload(workload, send, args.concurrency, args.request_rate, args.seed)
            runs[name].append(run)
            spent = cpu_ms_per_token(before, cpu_seconds_by_process(os.getpid()),
                                     sum(r.num_output_tokens for r in run[0]))
            cpu[name] = {k: cpu[name].get(k, 0.0) + v / args.rounds for k, v in spent.items()}
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
    overrides = {k: v for k, v in (("stream_interval", args.stream_interval), ("max_num_seqs", args.max_num_seqs))
                 if v is not None}
    if overrides:
        serve_args = serve_args.model_copy(update={"engine": serve_args.engine.model_copy(update=overrides)})
    vocab_size = K2Tokenizer.from_pretrained(serve_args.model_dir).num_base_tokens
    init_local_ray(serve_args, log_to_driver=False)
    try:
        url = start_app(serve_args)
        _wait_healthy(url, args.timeout_s)
        if args.tools:
            return asyncio.run(bench_tools(url, serve_args.model_name, vocab_size, args))
        if args.variants:
            model_ids = [served.id for served in serve_args.served_models]
            return {"variants": asyncio.run(bench_variants(url, model_ids, vocab_size, args))}
        return asyncio.run(bench_all(url, serve_args, vocab_size, args))
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


def overhead(report: dict, baselines: list[str]) -> dict:
    """The HTTP path against each baseline measured in the same run."""
    http = report["http"]
    return {f"vs_{name}": {
        "throughput_ratio": http["output_tokens_per_s"] / report[name]["output_tokens_per_s"],
        "ttft_p50_delta_ms": http["ttft_ms"]["p50"] - report[name]["ttft_ms"]["p50"],
        "tpot_p50_delta_ms": http["tpot_ms"]["p50"] - report[name]["tpot_ms"]["p50"],
    } for name in baselines}


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def _baselines(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    if not names or any(name not in BASELINES for name in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(BASELINES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="benchmark a running app (HTTP only); default: start one")
    p.add_argument("--model", default=None, help="model id for --url (default: the first of /v1/models); with "
                   "--variants a comma-separated list (default: all of /v1/models)")
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "deploy/serve/local.yaml"))
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--ray-num-cpus", type=int, default=8)
    p.add_argument("--direct-ingress", action=argparse.BooleanOptionalAction, default=None,
                   help="override direct_ingress (HTTP served by the router replica, no proxy hop)")
    p.add_argument("--stream-interval", type=int, default=None, help="override engine.stream_interval")
    p.add_argument("--max-num-seqs", type=int, default=None, help="override engine.max_num_seqs")
    p.add_argument("--variants", action="store_true",
                   help="HTTP only: requests spread evenly over the served model ids, latency per id")
    p.add_argument("--tools", action="store_true",
                   help="HTTP chat only: no tools vs tools declared (auto, required), constrained steps' cost")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: closed loop")
    p.add_argument("--num-requests", type=int, default=64, help="per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds alternating HTTP and the baselines")
    p.add_argument("--baselines", type=_baselines, default=["core"],
                   help="comma-separated, of: core (engine core process, the headline), inprocess (old)")
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


def print_summary(report: dict) -> None:
    for name in ("http", *BASELINES):
        if (path := report.get(name)) is not None:
            print(f"{name:<10} {path['output_tokens_per_s']:>8.1f} output tok/s, "
                  f"p50 TTFT {path['ttft_ms']['p50']:.1f} ms, p50 TPOT {path['tpot_ms']['p50']:.2f} ms")
    for model, path in report.get("variants", {}).items():
        print(f"{model:<24} TTFT p50 {path['ttft_ms']['p50']:.1f} / p99 {path['ttft_ms']['p99']:.1f} ms, "
              f"TPOT p50 {path['tpot_ms']['p50']:.2f} / p99 {path['tpot_ms']['p99']:.2f} ms, "
              f"{path['num_ok']}/{path['num_requests']} ok")
    for name, path in report.get("tools", {}).items():
        print(f"{name:<16} {path['output_tokens_per_s']:>8.1f} output tok/s, p50 TPOT {path['tpot_ms']['p50']:.2f} ms, "
              f"{path['num_ok']}/{path['num_requests']} ok")
    for name, gap in report.get("tools_cost", {}).items():
        print(f"{name}: {gap['throughput_ratio']:.2f}x throughput, {gap['tpot_p50_ratio']:.2f}x p50 TPOT "
              f"({gap['tpot_p50_delta_ms']:+.2f} ms)")
    for name, gap in report.get("overhead", {}).items():
        print(f"HTTP {name}: {gap['throughput_ratio']:.2f}x throughput, "
              f"p50 TTFT {gap['ttft_p50_delta_ms']:+.1f} ms, p50 TPOT {gap['tpot_p50_delta_ms']:+.2f} ms")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    is_plain = not (args.variants or args.tools)
    if args.url and args.tools:
        model = args.model or httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
        report = asyncio.run(bench_tools(args.url, model, BYTE_TOKENS, args))
    elif args.url and args.variants:
        model_ids = args.model.split(",") if args.model else [
            card["id"] for card in httpx.get(f"{args.url}/v1/models").json()["data"]]
        report = {"variants": asyncio.run(bench_variants(args.url, model_ids, BYTE_TOKENS, args))}
    elif args.url:
        model = args.model or httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
        workload = make_workload(args, BYTE_TOKENS, args.seed)
        report = {"http": asyncio.run(bench_http(args.url, model, workload, args))}
    else:
        report = _serve_and_bench(args)
        if is_plain:
            report["overhead"] = overhead(report, args.baselines)
    report["workload"] = {k: v for k, v in vars(args).items() if k not in ("url", "out")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    if is_plain:
        plot_report(report, out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in report if k != "workload"}, indent=2, default=str))
    print_summary(report)


if __name__ == "__main__":
    main()

