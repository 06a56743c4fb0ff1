"""Tool-call validity against a running server, in the style of K2-Vendor-Verifier.

    python load_tests/tool_call_eval.py --url http://127.0.0.1:8000 --requests 200
    python load_tests/tool_call_eval.py --requests 300 --out eval.json

Each request declares two or three of a fixed set of tools (nested objects, enums, arrays, required
fields), with tool_choice auto, required or named, thinking on or off, parallel calls on or off, through
OpenAI chat, Anthropic Messages and the OpenAI Responses API, streamed or not (cycled so every mix is
covered). The report (JSON): finish-reason counts, calls per request, and the share of calls whose name is
declared and whose arguments parse and validate against that tool's schema (jsonschema); forced requests
(required/named) that came back without a call, named requests that called another tool, parallel-off
requests with more than one call. Calls of requests cut by the output budget (`length`) are scored
apart: a call can be cut mid-arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
from collections import Counter
from typing import Any

import httpx
from jsonschema import Draft202012Validator, ValidationError
from tool_call_senders import Case, Outcome, send  # sibling module (run as a script)

TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}},
    "book_flight": {"type": "object", "additionalProperties": False, "required": ["route", "passengers"],
                    "properties": {
                        "route": {"type": "object", "additionalProperties": False, "required": ["origin", "dest"],
                                  "properties": {"origin": {"type": "string", "maxLength": 8},
                                                 "dest": {"type": "string", "maxLength": 8}}},
                        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                        "cabin": {"enum": ["economy", "business"]}}},
    "create_event": {"type": "object", "additionalProperties": False, "required": ["title", "attendees"],
                     "properties": {
                         "title": {"type": "string", "maxLength": 12},
                         "attendees": {"type": "array", "maxItems": 3, "items": {
                             "type": "object", "additionalProperties": False, "required": ["name"],
                             "properties": {"name": {"type": "string", "maxLength": 8},
                                            "optional": {"type": "boolean"}}}},
                         "priority": {"enum": ["low", "high"]}}},
    "set_thermostat": {"type": "object", "additionalProperties": False, "required": ["mode", "eco"],
                       "properties": {"mode": {"enum": ["heat", "cool", "off"]}, "eco": {"type": "boolean"},
                                      "target": {"type": "number", "minimum": 10, "maximum": 30}}},
    "lookup_order": {"type": "object", "additionalProperties": False, "required": ["order_id"], "properties": {
        "order_id": {"type": "string", "maxLength": 10},
        "fields": {"type": "array", "maxItems": 3, "items": {"enum": ["status", "total", "items"]}}}},
}
PROMPTS = ["What's the weather in Oslo this week?", "Book me a flight from Paris to Lima for two.",
           "Set up a meeting with Ana and Bo.", "Make it cooler in here.", "Where is order 4411?"]
APIS = ("openai", "anthropic", "responses")
CHOICES = ("auto", "required", "named")
NUM_SAMPLES = 5  # invalid calls quoted in the report
PARALLEL_SHARE = 0.5  # of requests with parallel tool calls on
VALIDATORS = {name: Draft202012Validator(schema) for name, schema in TOOLS.items()}


def make_cases(num_requests: int, seed: int) -> list[Case]:
    """Every mix of API x stream x tool_choice x thinking in turn (shuffled once); tools, the parallel
    setting and the forced name are drawn."""
    rng = random.Random(seed)
    mixes = list(itertools.product(APIS, (False, True), CHOICES, (True, False)))
    rng.shuffle(mixes)
    cases = []
    for i, (api, is_stream, choice, is_thinking) in zip(range(num_requests), itertools.cycle(mixes)):
        names = rng.sample(sorted(TOOLS), rng.choice((2, 3)))
        cases.append(Case(api, is_stream, choice, is_thinking, rng.random() < PARALLEL_SHARE,
                          {n: TOOLS[n] for n in names}, rng.choice(names) if choice == "named" else None, seed + i))
    return cases


def call_problem(case: Case, name: str, arguments: str) -> str | None:
    """Why a call is not valid (None: it is)."""
    if name not in case.tools:
        return "undeclared"
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return "unparsable"
    return None if VALIDATORS[name].is_valid(value) else "schema_invalid"


def schema_error(name: str, arguments: str) -> ValidationError | None:
    """The first schema violation of a declared call's parsable arguments."""
    return next(VALIDATORS[name].iter_errors(json.loads(arguments)), None)


def score(cases: list[Case], outcomes: list[Outcome]) -> dict[str, Any]:
    finishes: Counter[str] = Counter()
    calls_per_request: Counter[int] = Counter()
    problems: dict[str, Counter[str]] = {"finished": Counter(), "length": Counter()}
    num_calls = {"finished": 0, "length": 0}
    forced = Counter()
    errors = [o.error for o in outcomes if o.error]
    samples: list[str] = []
    keywords: Counter[str] = Counter()  # the JSON Schema keyword each invalid call broke
    for case, out in zip(cases, outcomes, strict=True):
        if out.error:
            continue
        finishes[f"{case.api}/{out.finish}"] += 1
        calls_per_request[len(out.calls)] += 1
        part = "length" if out.finish == "length" else "finished"
        num_calls[part] += len(out.calls)
        for name, arguments in out.calls:
            problem = call_problem(case, name, arguments)
            problems[part][problem or "valid"] += 1
            if problem == "schema_invalid" and part == "finished":
                error = schema_error(name, arguments)
                keywords[error.validator] += 1
                if len(samples) < NUM_SAMPLES:
                    samples.append(f"{case.api} {name}: {error.json_path}: {error.message[:160]}")
        if case.choice != "auto" and out.finish != "length":
            forced["requests"] += 1
            forced["with_call"] += bool(out.calls)
        if case.choice == "named":
            forced["named_other_tool"] += any(name != case.forced_name for name, _ in out.calls)
        if not case.is_parallel:
            forced["parallel_off_requests"] += 1
            forced["parallel_off_over_one_call"] += len(out.calls) > 1
    valid = problems["finished"]["valid"]
    return {
        "requests": len(cases), "errors": len(errors), "error_samples": errors[:5],
        "finish_reasons": dict(sorted(finishes.items())),
        "calls_per_request": dict(sorted(calls_per_request.items())),
        "calls": num_calls, "call_problems": {k: dict(v) for k, v in problems.items()},
        "schema_valid_share": valid / num_calls["finished"] if num_calls["finished"] else None,
        "schema_invalid_by_keyword": dict(keywords), "schema_invalid_samples": samples,
        "undeclared_names": problems["finished"]["undeclared"] + problems["length"]["undeclared"],
        "forced": dict(forced),
        "forced_with_call_share": forced["with_call"] / forced["requests"] if forced["requests"] else None,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    timeout = httpx.Timeout(args.timeout_s)
    async with httpx.AsyncClient(base_url=args.url, timeout=timeout,
                                 headers={"anthropic-version": "2023-06-01"}) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        cases = make_cases(args.requests, args.seed)
        gate = asyncio.Semaphore(args.concurrency)

        async def one(i: int, case: Case) -> Outcome:
            async with gate:
                return await send(http, case, model, PROMPTS[i % len(PROMPTS)], args.max_tokens)

        outcomes = await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))
    return {"model": model, "max_tokens": args.max_tokens, **score(cases, list(outcomes))}


def print_table(report: dict[str, Any]) -> None:
    """The headline figures, one per line (the JSON above holds the rest)."""
    calls, forced = report["calls"], report["forced"]
    share = report["schema_valid_share"]
    forced_share = report["forced_with_call_share"]
    rows = [("requests (errors)", f"{report['requests']} ({report['errors']})"),
            ("calls (finished / cut by length)", f"{calls['finished']} / {calls['length']}"),
            ("schema-valid share of finished calls", "n/a" if share is None else f"{share:.1%}"),
            ("undeclared names", str(report["undeclared_names"])),
            ("required/named with a call", "n/a" if forced_share is None else
             f"{forced.get('with_call', 0)}/{forced.get('requests', 0)} ({forced_share:.1%})"),
            ("named calling another tool", str(forced.get("named_other_tool", 0))),
            ("parallel off with > 1 call", f"{forced.get('parallel_off_over_one_call', 0)}/"
                                           f"{forced.get('parallel_off_requests', 0)}"),
            ("calls per request", json.dumps(report["calls_per_request"])),
            ("finish reasons", json.dumps(report["finish_reasons"]))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="served model id (default: the first of /v1/models)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--out", default=None, help="also write the report to this JSON file")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    print_table(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
