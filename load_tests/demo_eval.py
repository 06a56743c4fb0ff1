"""The demo model's eval through a running server and the `openai` SDK, with the tool-call grammar on and off.

    python load_tests/demo_eval.py                       # against `make serve` (http://127.0.0.1:8000/v1)
    python load_tests/demo_eval.py --base-url http://127.0.0.1:8011/v1 --cases-per-task 50 --out eval.json

Held-out prompts (k2ray/demo: phrasings and values kept out of training), `--cases-per-task` of each task:
arithmetic, get_weather, convert_units, a multi-turn follow-up and a decline. The eval plays the client
tools (k2ray/demo/tools.py) and sends their results back, then checks the final answer states the returned
values. One `$web_search` round trip per pass (Moonshot's protocol: the call ends the first response, the
client echoes its arguments, the next request searches the local index) must bill exactly one search.
Each pass runs once with the grammar (the default) and once with `constrain_tool_calls: false`, the request
option that leaves tool calls to the model. Prints a table; exits 1 when a target (demo_eval_scoring.Targets)
is missed, 2 when the server is unreachable, 3 past --total-timeout-s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from urllib.parse import urlsplit

import openai
from demo_eval_cases import heldout_eval_cases, search_case  # sibling modules (run as a script)
from demo_eval_scoring import Tally, Targets, format_table, shortfalls
from demo_eval_turns import run_case, run_search_round_trip

from k2ray.demo.conversations import HeldoutCase

PASSES = {"constrained": True, "unconstrained": False}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
EXIT_MISSED, EXIT_UNREACHABLE, EXIT_TIMED_OUT = 1, 2, 3


def check_loopback(base_url: str) -> str:
    """The eval talks to a local server only."""
    host = urlsplit(base_url).hostname
    if host not in LOOPBACK_HOSTS:
        raise SystemExit(f"demo_eval: --base-url must be a loopback address, got {base_url!r}")
    return base_url.rstrip("/")


async def run_pass(client: openai.AsyncOpenAI, model: str, cases: list[HeldoutCase], is_constrained: bool,
                   args: argparse.Namespace) -> Tally:
    tally = Tally()
    gate = asyncio.Semaphore(args.concurrency)

    async def one(case: HeldoutCase) -> None:
        async with gate:
            await run_case(client, model, case, is_constrained, args.max_tokens, tally)

    await asyncio.gather(*(one(c) for c in cases))
    await run_search_round_trip(client, model, search_case(args.seed), is_constrained, args.max_tokens, tally)
    return tally


async def evaluate(client: openai.AsyncOpenAI, args: argparse.Namespace) -> dict[str, Tally]:
    """Every pass of args.passes over the same held-out cases."""
    model = args.model or (await client.models.list()).data[0].id
    cases = heldout_eval_cases(args.cases_per_task, args.seed)
    return {name: await run_pass(client, model, cases, is_constrained, args)
            for name, is_constrained in PASSES.items() if name in args.passes}


async def evaluate_server(args: argparse.Namespace) -> dict[str, Tally]:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="unused", timeout=args.timeout_s, max_retries=0)
    try:
        return await evaluate(client, args)
    finally:
        await client.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="served model id (default: the first of /v1/models)")
    parser.add_argument("--cases-per-task", type=int, default=50)
    parser.add_argument("--passes", nargs="+", choices=list(PASSES), default=list(PASSES))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=200, help="per response")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--total-timeout-s", type=float, default=1800.0, help="the whole eval")
    parser.add_argument("--out", default=None, help="also write the tallies to this JSON file")
    args = parser.parse_args(argv)
    args.base_url = check_loopback(args.base_url)
    return args


def report(tallies: dict[str, Tally], args: argparse.Namespace, elapsed_s: float) -> int:
    """Prints the table and every missed target; the exit code."""
    print(format_table(tallies))
    print(f"({args.cases_per_task} cases per task per pass, {elapsed_s:.0f} s)")
    for name, tally in tallies.items():
        for sample in tally.invalid_calls + tally.samples:
            print(f"  {name}: {sample}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({name: asdict(t) for name, t in tallies.items()}, f, indent=2)
    missed = [f"{name}: {s}" for name, t in tallies.items() for s in shortfalls(t, PASSES[name], Targets())]
    for line in missed:
        print(f"below target: {line}", file=sys.stderr)
    return EXIT_MISSED if missed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    try:
        tallies = asyncio.run(asyncio.wait_for(evaluate_server(args), args.total_timeout_s))
    except openai.APIConnectionError as exc:
        print(f"demo_eval: no server at {args.base_url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except asyncio.TimeoutError:
        print(f"demo_eval: not done within {args.total_timeout_s:.0f} s", file=sys.stderr)
        return EXIT_TIMED_OUT
    return report(tallies, args, time.monotonic() - start)


if __name__ == "__main__":
    sys.exit(main())
