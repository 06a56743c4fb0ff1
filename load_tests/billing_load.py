"""Billing under load: a mix of requests over 2 router replicas, checked against the ledger to the last digit.

    python load_tests/billing_load.py                       # SQLite ledger
    python load_tests/billing_load.py --ledger postgresql   # a throwaway PostgreSQL on 127.0.0.1 (Debian's binaries)
    python load_tests/billing_load.py --num-requests 400 --concurrency 32 --out report.json

Starts a local app on the demo model (2 routers, API keys, the test-only injection, `$web_search` in server
mode on the embedded index), then sends OpenAI chat and Anthropic Messages requests, streamed and not: plain
generations (a share behind one long common prefix, so some are cache hits), server-side search loops,
requests the engine fails before any output and after some (`k2ray_test.fail_after_tokens`), and streams the
client abandons. Checks: the key's ledger holds exactly one record per request sent; every record whose
client received usage equals that usage; every record is priced exactly by its plan; failures before output
are billed nothing; the ledger's totals equal the clients' usage plus what the abandoned and failed streams
were sent, and `/v1/usage` reports those same totals. Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx

from k2ray.model.default_checkpoint import tiny_checkpoint_dir

ADMIN_TOKEN = "billing-load-admin"
MODEL = "k2-tiny"
ENGINE = {"num_cpus": 1, "torch_threads": 1, "block_size": 16, "max_num_seqs": 32, "max_num_batched_tokens": 1024,
          "max_model_len": 1024, "num_kv_blocks": 1024, "enable_prefix_caching": True}
RAY_NUM_CPUS = 8
HEALTH_TIMEOUT_S = 300.0
LEDGER_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0
PREFIX = " ".join(f"fact {i}: the river {i} runs to the sea." for i in range(30))
KINDS = ("chat", "chat_stream", "messages", "messages_stream", "search", "search_stream", "messages_search",
         "fail_before", "fail_after_stream", "cancel_stream")
SEARCH_CALL = ('<think>look it up</think><|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:0'
               '<|tool_call_argument_begin|>{{"query": "first people to land on the Moon"}}<|tool_call_end|>'
               '<|tool_calls_section_end|><|im_end|>')
ANSWER = "<think>found</think>It was Neil Armstrong.<|im_end|>"
CANCEL_AFTER_CHUNKS = 3
FAIL_AFTER_TOKENS = 3


def _body(kind: str, rng: random.Random) -> tuple[str, dict]:
    """(path, body) of one request of `kind`."""
    user = [{"role": "user", "content": f"question {rng.randrange(10**6)}"}]
    if rng.random() < 0.5 and "search" not in kind:  # a search's results need the context's room
        user = [{"role": "user", "content": PREFIX + " " + user[0]["content"]}]
    is_anthropic = kind.startswith("messages")
    body: dict = {"model": MODEL, "messages": user, "max_tokens": rng.randint(4, 16), "temperature": 1.0}
    body |= {} if is_anthropic else {"thinking": {"type": "disabled"}, "ignore_eos": True}
    if kind.endswith("stream"):
        body["stream"] = True
        if not is_anthropic:
            body["stream_options"] = {"include_usage": True}
    if "search" in kind:
        name = "web_search" if is_anthropic else "$web_search"
        body["tools"] = ([{"type": "web_search_20250305", "name": name, "max_uses": 2}] if is_anthropic
                         else [{"type": "builtin_function", "function": {"name": name}}])
        body["max_tokens"] = 200
        body["k2ray_test"] = {"rounds": [SEARCH_CALL.format(name=name), ANSWER]}
    elif kind == "fail_before":
        body["k2ray_test"] = {"fail_after_tokens": 0}
    elif kind == "fail_after_stream":
        body["k2ray_test"], body["max_tokens"] = {"fail_after_tokens": FAIL_AFTER_TOKENS}, 32
    elif kind == "cancel_stream":
        body["max_tokens"] = 64
    return ("/v1/messages" if is_anthropic else "/v1/chat/completions"), body


def _openai_usage(usage: dict) -> dict:
    return {"prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"],
            "completion": usage["completion_tokens"],
            "reasoning": usage["completion_tokens_details"]["reasoning_tokens"],
            "searches": (usage.get("server_tool_use") or {}).get("web_search_requests", 0)}


def _anthropic_usage(usage: dict) -> dict:
    cached = usage["cache_read_input_tokens"]
    return {"prompt": usage["input_tokens"] + cached, "cached": cached, "completion": usage["output_tokens"],
            "reasoning": None, "searches": (usage.get("server_tool_use") or {}).get("web_search_requests", 0)}


def _payloads(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


async def _send(http: httpx.AsyncClient, kind: str, path: str, body: dict) -> dict:
    """What the client saw: the request id (if any), the usage it received (if any), how it ended."""
    if not body.get("stream"):
        resp = await http.post(path, json=body)
        if resp.status_code != 200:
            return {"kind": kind, "id": None, "usage": None, "status": resp.status_code, "error": resp.text[:200]}
        data = resp.json()
        usage = _anthropic_usage(data["usage"]) if path == "/v1/messages" else _openai_usage(data["usage"])
        return {"kind": kind, "id": data["id"], "usage": usage, "status": 200}
    lines: list[str] = []
    async with http.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode()[:200]
            return {"kind": kind, "id": None, "usage": None, "status": resp.status_code, "error": text}
        async for line in resp.aiter_lines():
            lines.append(line)
            if kind == "cancel_stream" and len(_payloads(lines)) >= CANCEL_AFTER_CHUNKS:
                break  # leaving the block closes the connection mid-stream
    payloads = _payloads(lines)
    first = payloads[0]
    request_id = first["message"]["id"] if path == "/v1/messages" else first["id"]
    usage = None
    if path == "/v1/messages" and payloads[-1].get("type") == "message_stop":
        usage = _anthropic_usage(payloads[-2]["usage"])
    elif path != "/v1/messages" and payloads[-1].get("usage") and "error" not in payloads[-1]:
        usage = _openai_usage(payloads[-1]["usage"])
    return {"kind": kind, "id": request_id, "usage": usage, "status": resp.status_code}


async def run_load(base: str, secret: str, num_requests: int, concurrency: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    jobs = [(kind, *_body(kind, rng)) for kind in (KINDS[i % len(KINDS)] for i in range(num_requests))]
    rng.shuffle(jobs)
    gate = asyncio.Semaphore(concurrency)
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        async def one(job: tuple[str, str, dict]) -> dict:
            async with gate:
                return await _send(http, *job)

        return await asyncio.gather(*(one(job) for job in jobs))


def _ledger_rows(dsn: str, key_id: str, num_expected: int) -> list[dict]:
    import sqlalchemy as sa

    from k2ray.billing import make_engine
    from k2ray.billing.schema import usage

    engine = make_engine(dsn)
    deadline = time.monotonic() + LEDGER_TIMEOUT_S
    try:
        while True:
            with engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(sa.select(usage).where(usage.c.key_id == key_id))]
            if len(rows) >= num_expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        engine.dispose()


def check(results: list[dict], rows: list[dict], usage_report: dict) -> dict:
    """The figures, and the list of every mismatch (empty when the ledger equals what the clients saw)."""
    from k2ray.billing import BUILTIN_PLANS, UsageCounts, format_usd, price_counts

    by_id = {r["request_id"]: r for r in rows}
    problems = []
    num_refused = sum(400 <= r["status"] < 500 for r in results)  # refused before dispatch: no record
    if len(rows) != len(results) - num_refused or len(by_id) != len(rows):
        problems.append(f"{len(rows)} records ({len(by_id)} distinct) for {len(results) - num_refused} requests")
    totals = Counter()
    for row in rows:
        counts = UsageCounts(row["num_prompt_tokens"], row["num_cached_tokens"], row["num_completion_tokens"],
                             row["num_reasoning_tokens"], row["num_web_searches"])
        if price_counts(BUILTIN_PLANS[row["plan"]], counts).total_pico_usd != row["total_pico_usd"]:
            problems.append(f"{row['request_id']}: priced {row['total_pico_usd']}, plan says otherwise")
        totals.update({"prompt": counts.num_prompt_tokens, "cached": counts.num_cached_tokens,
                       "completion": counts.num_completion_tokens, "searches": counts.num_web_searches,
                       "cost": row["total_pico_usd"]})
    seen, sent_only = Counter(), Counter()
    for result in results:
        row = by_id.get(result["id"]) if result["id"] else None
        if result["id"] and row is None:
            problems.append(f"{result['id']}: no record")
        if result["usage"] is not None and row is not None:
            got = {"prompt": row["num_prompt_tokens"], "cached": row["num_cached_tokens"],
                   "completion": row["num_completion_tokens"], "reasoning": row["num_reasoning_tokens"],
                   "searches": row["num_web_searches"]}
            expected = {k: v if v is not None else got[k] for k, v in result["usage"].items()}
            if got != expected:
                problems.append(f"{result['id']}: ledger {got} != client {expected}")
            seen.update({k: v for k, v in got.items() if k != "reasoning"} | {"cost": row["total_pico_usd"]})
        elif row is not None:  # an abandoned or failed stream: billed for what it was sent
            sent_only.update({"prompt": row["num_prompt_tokens"], "cached": row["num_cached_tokens"],
                              "completion": row["num_completion_tokens"], "searches": row["num_web_searches"],
                              "cost": row["total_pico_usd"]})
    # The requests without an id (errors before any output) are in `totals` only: their records must hold nothing.
    if +totals != +(seen + sent_only):
        problems.append(f"ledger totals {dict(totals)} != clients' {dict(seen)} + streams sent {dict(sent_only)}")
    report_totals = usage_report["totals"]
    if report_totals["cost_usd"] != format_usd(totals["cost"]) or report_totals["requests"] != len(rows):
        problems.append(f"/v1/usage {report_totals} != ledger {dict(totals)}")
    statuses = Counter(row["status"] for row in rows)
    errors = Counter(f"{r['kind']} {r['status']}" for r in results if r["status"] != 200)
    return {"requests": len(results), "records": len(rows), "error_statuses": dict(errors),
            "error_samples": sorted({r["error"] for r in results if r.get("error")})[:3], "by_kind": dict(Counter(r["kind"] for r in results)),
            "record_status": dict(statuses), "with_client_usage": sum(r["usage"] is not None for r in results),
            "ledger_totals": dict(totals) | {"cost_usd": format_usd(totals["cost"])},
            "usage_endpoint_cost_usd": report_totals["cost_usd"], "problems": problems}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(dsn: str, num_routers: int) -> str:
    from k2ray.serve.args import load_serve_args
    from k2ray.serve.launcher import init_local_ray, start_app

    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "port": _free_port(), "served_model_name": MODEL,
        "engine": ENGINE, "log_level": "ERROR",
        "router": {"num_replicas": num_routers, "num_cpus": 0.25, "auth": True, "admin_token": ADMIN_TOKEN,
                   "max_inflight_requests": 64},
        "billing": {"ledger": dsn, "flush_interval_s": 0.05},
        "tools": {"web_search": {"mode": "server", "max_results": 1, "max_result_chars": 300,
                                 "max_tool_result_chars": 600}},
        "testing": {"allow_injection": True},
    })
    init_local_ray(args, num_cpus=RAY_NUM_CPUS, log_to_driver=False)
    base = start_app(args)
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the app never became healthy")
        time.sleep(0.5)


def _ledger_dsn(choice: str, stack: ExitStack) -> str:
    if choice == "sqlite":
        return str(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "ledger.db")
    if choice != "postgresql":
        return choice  # a DSN
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' throwaway PostgreSQL helper
    from tests.billing.postgres_server import INSTALL_HINT, find_bin_dir, postgres_server

    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit(f"PostgreSQL binaries not found: {INSTALL_HINT}")
    return stack.enter_context(postgres_server(bin_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", default="sqlite", help="sqlite, postgresql, or a DSN")
    parser.add_argument("--num-requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--num-routers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    with ExitStack() as stack:
        dsn = _ledger_dsn(args.ledger, stack)
        base = _serve(dsn, args.num_routers)
        try:
            created = httpx.post(f"{base}/admin/keys", json={"name": "billing-load", "rpm": 100_000,
                                                             "concurrency": args.concurrency * 2},
                                 headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
            key_id, secret = created["key"]["key_id"], created["secret"]
            started = time.monotonic()
            results = asyncio.run(run_load(base, secret, args.num_requests, args.concurrency, args.seed))
            elapsed_s = time.monotonic() - started
            rows = _ledger_rows(dsn, key_id, sum(not 400 <= r["status"] < 500 for r in results))
            usage_report = httpx.get(f"{base}/v1/usage", headers={"authorization": f"Bearer {secret}"}).json()
        finally:
            serve.shutdown()
            ray.shutdown()
    report = {"ledger": args.ledger, "num_routers": args.num_routers, "elapsed_s": round(elapsed_s, 1),
              **check(results, rows, usage_report)}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if report["problems"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
