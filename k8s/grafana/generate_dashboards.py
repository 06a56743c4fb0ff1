"""Generate k2ray's Grafana dashboards (k8s/grafana/dashboards/*.json) - the one source of their JSON.

    python k8s/grafana/generate_dashboards.py          # rewrite the JSON files, PANELS.md and README's panel list
    python k8s/grafana/generate_dashboards.py --check  # exit 1 if a committed file differs

Series names are those Ray's exporter scrapes (`ray_` prefix, `_total` on counters; see
k2ray/serve/metrics/catalog.py). Every dashboard has a Prometheus datasource variable and pool / replica /
model template variables; tests/serve/metrics checks every expression against the metrics k2ray defines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GRAFANA_DIR = Path(__file__).resolve().parent
OUT_DIR = GRAFANA_DIR / "dashboards"
PANELS_DOC = GRAFANA_DIR / "PANELS.md"
README = GRAFANA_DIR.parents[1] / "README.md"
README_BEGIN, README_END = "<!-- panels:begin (k8s/grafana/generate_dashboards.py) -->", "<!-- panels:end -->"
RATE = "$__rate_interval"
POOL = 'pool=~"$pool", replica=~"$replica"'
MODEL = 'model=~"$model"'
GRID_WIDTH, PANEL_WIDTH, PANEL_HEIGHT = 24, 8, 8
QUANTILES = (0.5, 0.9, 0.99)
SCHEMA_VERSION = 39


def quantiles(metric: str, selector: str, by: str = "") -> list[tuple[str, str]]:
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
             f"{prefix}p{round(q * 100)}") for q in QUANTILES]


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", *, description: str) -> dict[str, Any]:
    return {
        "type": "timeseries", "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(targets)],
    }


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def variable(name: str, query: str, include_all: bool = True) -> dict[str, Any]:
    return {"name": name, "label": name, "type": "query", "query": {"query": query, "refId": name},
            "definition": query, "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "refresh": 2, "includeAll": include_all, "allValue": ".*", "multi": True,
            "current": {"text": "All", "value": "$__all"}, "sort": 1}


def layout(sections: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Rows of panels, three to a line; ids in order."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, members in sections:
        panels.append({**row(title), "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}})
        y += 1
        for i, member in enumerate(members):
            x = (i * PANEL_WIDTH) % GRID_WIDTH
            if i and x == 0:
                y += PANEL_HEIGHT
            panels.append({**member, "gridPos": {"h": PANEL_HEIGHT, "w": PANEL_WIDTH, "x": x, "y": y}})
        y += PANEL_HEIGHT
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return panels


def dashboard(uid: str, title: str, sections: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "tags": ["k2ray"], "timezone": "utc", "schemaVersion": SCHEMA_VERSION,
        "editable": True, "refresh": "30s", "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {"text": "default", "value": "default"}},
            variable("pool", "label_values(ray_k2ray_running_requests, pool)"),
            variable("replica", 'label_values(ray_k2ray_running_requests{pool=~"$pool"}, replica)'),
            variable("model", "label_values(ray_k2ray_requests_total, model)"),
        ]},
        "panels": layout(sections),
    }


def serving() -> dict[str, Any]:
    latency = [
        panel("TTFT", quantiles("ray_k2ray_ttft_seconds", MODEL), "s",
              description="Request arrival to a choice's first token: p50, p90, p99"),
        panel("ITL", quantiles("ray_k2ray_itl_seconds", MODEL), "s", description="Gap between successive tokens of a choice, per token"),
        panel("TPOT", quantiles("ray_k2ray_tpot_seconds", MODEL), "s", description="(last token - first token) / (tokens - 1), per choice"),
        panel("End-to-end latency", quantiles("ray_k2ray_e2e_seconds", MODEL), "s",
              description="Arrival to the last byte (or the error), per request"),
    ]
    throughput = [
        panel("Requests/s by route", [(f"sum by (route) (rate(ray_k2ray_requests_total{{{MODEL}}}[{RATE}]))",
                                       "{{route}}")], "reqps",
              description="HTTP requests finished per second, by API route"),
        panel("Tokens/s", [(f"sum(rate(ray_k2ray_prompt_tokens_total{{{MODEL}}}[{RATE}]))", "prompt"),
                           (f"sum(rate(ray_k2ray_cached_tokens_total{{{MODEL}}}[{RATE}]))", "cached"),
                           (f"sum(rate(ray_k2ray_output_tokens_total{{{MODEL}}}[{RATE}]))", "output")],
              description="Prompt (cached included), cached and generated tokens delivered per second"),
        panel("Finish reasons/s", [(f"sum by (finish_reason) (rate(ray_k2ray_requests_total{{{MODEL}}}[{RATE}]))",
                                    "{{finish_reason}}")], "reqps",
              description="Requests per second by how they ended (stop, length, tool_calls, error, cancelled)"),
    ]
    pools = [
        panel("Running and waiting requests", [(f"sum by (pool) (ray_k2ray_running_requests{{{POOL}}})",
                                                "{{pool}} running"),
                                               (f"sum by (pool) (ray_k2ray_waiting_requests{{{POOL}}})",
                                                "{{pool}} waiting")],
              description="Requests in the engines' running batch and scheduler queue, per pool"),
        panel("KV cache usage", [(f"sum by (pool) (ray_k2ray_kv_blocks_used{{{POOL}}}) / "
                                  f"sum by (pool) (ray_k2ray_kv_blocks_total{{{POOL}}})", "{{pool}}")],
              "percentunit", description="KV blocks held by requests over all blocks, per pool"),
        panel("KV blocks", [(f"sum by (pool) (ray_k2ray_kv_blocks_{kind}{{{POOL}}})", f"{{{{pool}}}} {kind}")
                            for kind in ("used", "free", "cached")],
              description="KV blocks held by requests, free to allocate, and in the prefix cache (held or free), "
                          "per pool"),
        panel("Prefix cache hit rate", [(f"sum by (pool) (rate(ray_k2ray_prefix_cache_hits_total{{{POOL}}}[{RATE}]))"
                                         f" / sum by (pool) (rate(ray_k2ray_prefix_cache_queries_total{{{POOL}}}"
                                         f"[{RATE}]))", "{{pool}}")], "percentunit",
              description="Prompt tokens found in the prefix cache over tokens looked up, per pool"),
        panel("Engine tokens/s", [(f"sum by (pool) (rate(ray_k2ray_engine_prompt_tokens_total{{{POOL}}}[{RATE}]))",
                                   "{{pool}} prompt computed"),
                                  (f"sum by (pool) (rate(ray_k2ray_engine_generation_tokens_total{{{POOL}}}"
                                   f"[{RATE}]))", "{{pool}} generated")],
              description="Prompt tokens the engines computed (cache hits and received KV excluded) and tokens "
                          "they generated, per pool"),
        panel("Preemptions/s", [(f"sum by (pool) (rate(ray_k2ray_preemptions_total{{{POOL}}}[{RATE}]))",
                                 "{{pool}}")],
              description="Requests preempted for lack of KV blocks (recomputed later), per pool"),
        panel("Queue time", quantiles("ray_k2ray_queue_seconds", 'pool=~"$pool"', by="pool"), "s",
              description="Wait before a pool starts a request, per pool"),
    ]
    pd = [
        panel("KV transfer GB/s", [(f'sum by (pool) (rate(ray_k2ray_kv_transfer_bytes_total{{pool=~"$pool"}}[{RATE}]))'
                                    " / 1e9", "{{pool}}")], "short",
              description="Latent KV moved from prefill to decode, GB per second"),
        panel("KV transfer share of TTFT", [(f"sum(rate(ray_k2ray_kv_transfer_seconds_sum[{RATE}])) / "
                                             f"sum(rate(ray_k2ray_ttft_seconds_sum[{RATE}]))", "share")],
              "percentunit",
              description="Seconds spent moving KV over seconds to first token"),
        panel("Local prefills and retries/s", [(f"sum(rate(ray_k2ray_pd_local_prefills_total[{RATE}]))", "local"),
                                               (f"sum(rate(ray_k2ray_pd_prefill_retries_total[{RATE}]))", "retries")],
              description="Prompts the decode pool prefilled itself, and prefills retried elsewhere"),
    ]
    ep = [
        panel("Tokens per expert/s", [(f'sum by (expert) (rate(ray_k2ray_expert_tokens_total{{pool=~"$pool"}}[{RATE}]))',
                                       "{{expert}}")],
              description="Tokens routed to each expert per second (all MoE layers)"),
        panel("Expert imbalance (max/mean)", [(f"max by (pool) (ray_k2ray_expert_imbalance{{{POOL}}})", "{{pool}}")],
              description="Busiest expert's tokens over the mean, last reported step (1 = balanced)"),
        panel("Tokens per EP rank/s", [(f"sum by (pool, rank) (rate(ray_k2ray_ep_rank_tokens_total{{{POOL}}}[{RATE}]))",
                                        "{{pool}} rank {{rank}}")],
              description="Tokens routed to each expert-parallel rank's experts per second (all MoE layers)"),
        panel("EP rank imbalance (max/mean)", [(f"max by (pool) (ray_k2ray_ep_rank_imbalance{{{POOL}}})", "{{pool}}")],
              description="Busiest rank's tokens over the mean, last reported step (1 = balanced; what EPLB lowers)"),
    ]
    errors = [
        panel("Errors/s by status", [(f'sum by (status) (rate(ray_k2ray_requests_total{{status!~"2..", {MODEL}}}'
                                      f"[{RATE}]))", "{{status}}")], "reqps",
              description="Non-2xx responses per second, by HTTP status"),
        panel("Error ratio", [(f'sum(rate(ray_k2ray_requests_total{{finish_reason="error", {MODEL}}}[{RATE}])) / '
                               f"sum(rate(ray_k2ray_requests_total{{{MODEL}}}[{RATE}]))", "errors")], "percentunit",
              description="Share of requests that ended in an error (before or during generation)"),
    ]
    return dashboard("k2ray-serving", "k2ray / Serving", [
        ("Latency SLOs", latency), ("Throughput", throughput), ("Pools: queue and KV cache", pools),
        ("Disaggregated prefill/decode", pd), ("Expert parallelism", ep), ("Errors", errors)])


def billing() -> dict[str, Any]:
    usage = [
        panel("Billed tokens/s by meter", [(f'sum by (meter) (rate(ray_k2ray_billed_units_total{{meter!="web_search", '
                                            f"{MODEL}}}[{RATE}]))", "{{meter}}")],
              description="Billed uncached input, cached input and output tokens per second"),
        panel("Revenue per hour (USD)", [(f"sum by (model) (rate(ray_k2ray_billed_micro_usd_total{{{MODEL}}}[{RATE}]))"
                                          " * 3600 / 1e6", "{{model}}")], "currencyUSD",
              description="Billed USD per hour, by served model"),
        panel("Revenue per hour by meter (USD)", [(f"sum by (meter) (rate(ray_k2ray_billed_micro_usd_total{{{MODEL}}}"
                                                   f"[{RATE}])) * 3600 / 1e6", "{{meter}}")], "currencyUSD",
              description="Billed USD per hour, by meter"),
        panel("Searches per minute", [(f"sum(rate(ray_k2ray_searches_total{{{MODEL}}}[{RATE}])) * 60", "searches")],
              description="$web_search calls of finished requests per minute"),
    ]
    ledger = [
        panel("Ledger write failures", [(f"sum(increase(ray_k2ray_ledger_write_failures_total[{RATE}]))",
                                         "failures")],
              description="Failed ledger batch writes in the window (each is retried)"),
        panel("Ledger lag", [("max(ray_k2ray_ledger_lag_seconds)", "lag")], "s",
              description="Age of the oldest record at the last ledger write attempt"),
        panel("Records written/s", [(f"sum(rate(ray_k2ray_ledger_records_written_total[{RATE}]))", "records")],
              description="Usage records written to the ledger per second"),
    ]
    return dashboard("k2ray-billing", "k2ray / Billing", [("Usage and revenue", usage), ("Ledger", ledger)])


def panel_tables(dashboards: list[dict[str, Any]], dashboard_heading: str, row_heading: str) -> list[str]:
    """What each panel shows and the query behind it: Markdown lines, one table per dashboard row."""
    lines: list[str] = []
    for d in dashboards:
        lines += [f"{dashboard_heading} {d['title']} (`k8s/grafana/dashboards/{d['uid']}.json`)", ""]
        for p in d["panels"]:
            if p["type"] == "row":
                lines += ["", row_heading.format(p["title"]), "", "| panel | shows | query |", "| --- | --- | --- |"]
                continue
            queries = "<br>".join(f"`{t['expr']}`".replace("|", "\\|") for t in p["targets"])
            lines.append(f"| {p['title']} | {p['description']} | {queries} |")
        lines.append("")
    return lines


def panels_doc(dashboards: list[dict[str, Any]]) -> str:
    lines = ["# k2ray dashboards: panels and their queries", "",
             "Generated by `k8s/grafana/generate_dashboards.py` with the dashboards; do not edit by hand.", ""]
    return "\n".join(lines + panel_tables(dashboards, "##", "### {}"))


def readme_with_panels(readme: str, dashboards: list[dict[str, Any]]) -> str:
    """The README with its panel list (between the panels markers) regenerated."""
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    body = "\n".join(panel_tables(dashboards, "####", "**{}**")).strip()
    return readme[:start] + "\n" + body + "\n" + readme[end:]


def render_all() -> dict[Path, str]:
    """Path -> file text."""
    dashboards = [serving(), billing()]
    files = {OUT_DIR / f"{d['uid']}.json": json.dumps(d, indent=2, sort_keys=True) + "\n" for d in dashboards}
    files[PANELS_DOC] = panels_doc(dashboards)
    files[README] = readme_with_panels(README.read_text(), dashboards)
    return files


def main(argv: list[str]) -> int:
    files = render_all()
    if "--check" in argv:
        stale = [path.name for path, text in files.items() if not path.exists() or path.read_text() != text]
        print("stale: " + ", ".join(stale) if stale else "dashboards up to date")
        return 1 if stale else 0
    OUT_DIR.mkdir(exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
