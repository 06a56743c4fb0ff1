"""Disaggregated vs colocated on a mixed workload: long prompts arriving while short ones decode.

    python load_tests/pd_bench.py                  # the three apps on one local Ray, rounds alternated
    python load_tests/pd_bench.py --rounds 3 --long-rate 1.0

Both apps get the same total CPU: the colocated engine core runs on CPUs 0 and 1 with two threads; the
disaggregated prefill core runs on CPU 0 and the decode core on CPU 1, one thread each (routers and
Serve float). Short requests run in a closed loop (`--concurrency`) while long prompts arrive as a
Poisson stream (`--long-rate`); the short requests' ITL p99 is what prefill interference costs. Reports
TTFT p50/p99 and ITL p99 for short and long requests and goodput under the SLO, per app, and the
ratio of each disaggregated app (all remote; `conditional`: short prompts prefilled locally) to the
colocated one, medians over the rounds; JSON to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
from bench_report import summarize
from bench_senders import http_sender
from serve_bench import Workload, run_workload

LOOPBACK = "127.0.0.1"
BASE_ENGINE = {"block_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 2048, "max_model_len": 8192,
               "enable_prefix_caching": False, "num_kv_blocks": 4096, "num_cpus": 0.5}
APPS = {
    "colocated": {"engine": {**BASE_ENGINE, "torch_threads": 2, "cpu_affinity": [0, 1]}},
    "disaggregated": {"engine": {**BASE_ENGINE, "torch_threads": 1}, "disaggregated": True,
                      "prefill": {"cpu_affinity": [0]}, "decode": {"cpu_affinity": [1]},
                      "pd": {"local_prefill_threshold": 0, "kv_host": LOOPBACK}},
    # Conditional disaggregation: the short prompts (< 256 tokens) are prefilled on the decode replica.
    "conditional": {"engine": {**BASE_ENGINE, "torch_threads": 1}, "disaggregated": True,
                    "prefill": {"cpu_affinity": [0]}, "decode": {"cpu_affinity": [1]},
                    "pd": {"local_prefill_threshold": 256, "kv_host": LOOPBACK}},
}
BASELINE = "colocated"


def workloads(args: argparse.Namespace, vocab_size: int, seed: int) -> tuple[Workload, Workload]:
    rng = random.Random(seed)

    def make(num: int, prompt_len: tuple[int, int], output_len: tuple[int, int]) -> Workload:
        prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))] for _ in range(num)]
        return Workload(prompts, [rng.randint(*output_len) for _ in range(num)])

    return (make(args.num_short, args.short_prompt_len, args.short_output_len),
            make(args.num_long, args.long_prompt_len, args.long_output_len))


async def bench_app(url: str, model: str, short: Workload, long: Workload, args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency * 4, max_keepalive_connections=args.concurrency * 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        send = http_sender(client, model, 0.0)
        start = time.perf_counter()
        (short_results, _), (long_results, _) = await asyncio.gather(
            run_workload(short, send, args.concurrency, float("inf"), args.seed),
            run_workload(long, send, args.num_long, args.long_rate, args.seed))
        wall = time.perf_counter() - start
    return {"short": summarize(short_results, wall, args.slo_ttft_ms, args.slo_tpot_ms),
            "long": summarize(long_results, wall, args.slo_long_ttft_ms, args.slo_tpot_ms)}


def deploy(name: str, overrides: dict, port: int) -> str:
    from ray import serve

    from k2ray.model.default_checkpoint import tiny_checkpoint_dir
    from k2ray.serve.app import build_app
    from k2ray.serve.args import load_serve_args

    args = load_serve_args({"model": str(tiny_checkpoint_dir()), "app_name": name, "route_prefix": f"/{name}",
                            "served_model_name": "k2-tiny",
                            "router": {"num_cpus": 0.25, "channel_host": LOOPBACK}, **overrides})
    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"http://{LOOPBACK}:{port}/{name}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{name} never became healthy")


def headline(reports: dict[str, list[dict]]) -> dict:
    def median(app: str, kind: str, key: str, pct: str | None) -> float:
        values = sorted(r[kind][key][pct] if pct else r[kind][key] for r in reports[app])
        return values[len(values) // 2]

    rows = {}
    for kind, key, pct in (("short", "itl_ms", "p99"), ("short", "ttft_ms", "p50"), ("short", "ttft_ms", "p99"),
                           ("long", "ttft_ms", "p50"), ("long", "ttft_ms", "p99"),
                           ("short", "goodput_requests_per_s", None), ("short", "output_tokens_per_s", None)):
        baseline = median(BASELINE, kind, key, pct)
        row = {app: round(median(app, kind, key, pct), 2) for app in reports}
        for app in reports:
            if app != BASELINE and baseline:
                row[f"{app}/{BASELINE}"] = round(median(app, kind, key, pct) / baseline, 3)
        rows[f"{kind} {key} {pct or ''}".strip()] = row
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray
    from ray import serve

    from k2ray.api.tokenizer import K2Tokenizer
    from k2ray.model.default_checkpoint import tiny_checkpoint_dir

    vocab_size = K2Tokenizer.from_pretrained(tiny_checkpoint_dir()).num_base_tokens
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})  # as `k2ray serve` starts its Ray
    try:
        serve.start(http_options={"host": LOOPBACK, "port": args.port})
        urls = {name: deploy(name, overrides, args.port) for name, overrides in APPS.items()}
        reports: dict[str, list[dict]] = {name: [] for name in APPS}
        for round_index in range(args.rounds):
            short, long = workloads(args, vocab_size, args.seed + round_index)
            for name in (list(APPS) if round_index % 2 == 0 else list(reversed(APPS))):
                reports[name].append(asyncio.run(bench_app(urls[name], "k2-tiny", short, long, args)))
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"config": vars(args), "headline": headline(reports), "rounds": reports}
    for name in reports:
        for report in reports[name]:
            for kind in ("short", "long"):
                report[kind].pop("_raw", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["headline"], indent=2))


def _range(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(":"))
    return low, high


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8012)
    p.add_argument("--rounds", type=int, default=2, help="alternating app order")
    p.add_argument("--concurrency", type=int, default=8, help="short requests in flight")
    p.add_argument("--num-short", type=int, default=48)
    p.add_argument("--short-prompt-len", type=_range, default=(32, 96))
    p.add_argument("--short-output-len", type=_range, default=(96, 160))
    p.add_argument("--num-long", type=int, default=8)
    p.add_argument("--long-prompt-len", type=_range, default=(1500, 3000))
    p.add_argument("--long-output-len", type=_range, default=(4, 8))
    p.add_argument("--long-rate", type=float, default=1.0, help="long prompts per second (Poisson)")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0, help="short requests")
    p.add_argument("--slo-long-ttft-ms", type=float, default=5000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/pd_bench.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
