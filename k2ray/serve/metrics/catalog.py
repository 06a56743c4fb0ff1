"""Every k2ray metric: its name, kind, labels and buckets, and the series names Prometheus sees.

Metrics go out through Ray's metrics export (`ray.util.metrics`), whose exporter prefixes each name with
`ray_` and suffixes counters with `_total` (histograms: `_bucket`, `_sum`, `_count`), so the counter
`k2ray_requests` is scraped as `ray_k2ray_requests_total`. Dashboards and rules use the scraped names;
`series_names` is the one mapping both sides agree on.

No label ever carries an API key, a request id or other per-caller value (those belong in the ledger).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["counter", "gauge", "histogram"]

RAY_EXPORT_PREFIX = "ray_"  # added by Ray's exporter to every ray.util.metrics name

# Seconds, from sub-millisecond (a tiny CPU model's inter-token gap) to half an hour (a long K2 answer on GPUs).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
)

ROUTE, MODEL, STATUS, FINISH_REASON, METER = "route", "model", "status", "finish_reason", "meter"
POOL, REPLICA, EXPERT, RANK = "pool", "replica", "expert", "rank"
ENGINE_TAGS = (POOL, REPLICA)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if (self.kind == "histogram") != bool(self.boundaries):
            raise ValueError(f"{self.name}: histograms, and only histograms, have boundaries")


def _counter(name: str, description: str, *tag_keys: str) -> MetricSpec:
    return MetricSpec(name, "counter", description, tag_keys)


def _gauge(name: str, description: str, *tag_keys: str) -> MetricSpec:
    return MetricSpec(name, "gauge", description, tag_keys)


def _latency(name: str, description: str, *tag_keys: str) -> MetricSpec:
    return MetricSpec(name, "histogram", description, tag_keys, LATENCY_BUCKETS_S)


# Router: one per HTTP request / choice, as the client saw it.
REQUESTS = _counter("k2ray_requests", "HTTP requests by route, served model, HTTP status and finish reason",
                    ROUTE, MODEL, STATUS, FINISH_REASON)
TTFT = _latency("k2ray_ttft_seconds", "Request arrival to a choice's first generated token", MODEL)
ITL = _latency("k2ray_itl_seconds", "Gap between successive generated tokens of a choice (per token)", MODEL)
TPOT = _latency("k2ray_tpot_seconds", "(end - first token) / (output tokens - 1), per choice", MODEL)
E2E = _latency("k2ray_e2e_seconds", "Request arrival to its last byte (or its error)", ROUTE, MODEL)
PROMPT_TOKENS = _counter("k2ray_prompt_tokens", "Prompt tokens of finished requests (cached included)", MODEL)
CACHED_TOKENS = _counter("k2ray_cached_tokens", "Prompt tokens served from the prefix cache", MODEL)
OUTPUT_TOKENS = _counter("k2ray_output_tokens", "Generated tokens delivered (reasoning included)", MODEL)
REASONING_TOKENS = _counter("k2ray_reasoning_tokens", "Generated reasoning tokens delivered", MODEL)
SEARCHES = _counter("k2ray_searches", "$web_search calls of finished requests", MODEL)
# Billing: what the ledger records, summed over keys.
BILLED_MICRO_USD = _counter("k2ray_billed_micro_usd", "Billed micro-USD by meter and model", METER, MODEL)
BILLED_UNITS = _counter("k2ray_billed_units", "Billed tokens (searches for the web_search meter) by meter and model",
                        METER, MODEL)
LEDGER_WRITE_FAILURES = _counter("k2ray_ledger_write_failures", "Failed ledger batch writes (each is retried)")
LEDGER_RECORDS_WRITTEN = _counter("k2ray_ledger_records_written", "Usage records written to the ledger")
LEDGER_LAG = _gauge("k2ray_ledger_lag_seconds", "Age of the oldest record of the last ledger write attempt")

# Engine replicas: relayed from the engine core's stats (EngineMetricsRelay).
RUNNING_REQUESTS = _gauge("k2ray_running_requests", "Requests the engine is running", *ENGINE_TAGS)
WAITING_REQUESTS = _gauge("k2ray_waiting_requests", "Requests waiting in the engine's scheduler", *ENGINE_TAGS)
KV_BLOCKS_TOTAL = _gauge("k2ray_kv_blocks_total", "KV cache blocks of the engine", *ENGINE_TAGS)
KV_BLOCKS_USED = _gauge("k2ray_kv_blocks_used", "KV cache blocks held by requests", *ENGINE_TAGS)
KV_BLOCKS_FREE = _gauge("k2ray_kv_blocks_free", "KV cache blocks free to allocate (cached ones included)",
                        *ENGINE_TAGS)
KV_BLOCKS_CACHED = _gauge("k2ray_kv_blocks_cached", "KV blocks in the prefix cache (held or free to reuse)",
                          *ENGINE_TAGS)
PREFIX_CACHE_QUERIES = _counter("k2ray_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                *ENGINE_TAGS)
PREFIX_CACHE_HITS = _counter("k2ray_prefix_cache_hits", "Prompt tokens found in the prefix cache", *ENGINE_TAGS)
PREEMPTIONS = _counter("k2ray_preemptions", "Requests preempted (recomputed later) for lack of KV blocks",
                       *ENGINE_TAGS)
ENGINE_PROMPT_TOKENS = _counter("k2ray_engine_prompt_tokens",
                                "Prompt tokens the engine computed (prefix-cache hits and received KV excluded)",
                                *ENGINE_TAGS)
ENGINE_GENERATION_TOKENS = _counter("k2ray_engine_generation_tokens", "Tokens the engine generated", *ENGINE_TAGS)

# Disaggregated prefill/decode.
KV_TRANSFER_BYTES = _counter("k2ray_kv_transfer_bytes", "Latent KV bytes moved from prefill to decode", POOL)
KV_TRANSFER_SECONDS = _latency("k2ray_kv_transfer_seconds", "Time to move one request's KV", POOL)
PD_LOCAL_PREFILLS = _counter("k2ray_pd_local_prefills", "Prompts prefilled on the decode pool itself", POOL)
PD_PREFILL_RETRIES = _counter("k2ray_pd_prefill_retries", "Prefills retried on another prefill replica", POOL)
QUEUE_SECONDS = _latency("k2ray_queue_seconds", "Time a request waited before its pool started it", POOL)

# Expert parallelism.
EXPERT_TOKENS = _counter("k2ray_expert_tokens", "Tokens routed to each expert (all MoE layers)", POOL, EXPERT)
EXPERT_IMBALANCE = _gauge("k2ray_expert_imbalance", "Max over mean tokens per expert, last reported step",
                          *ENGINE_TAGS)
# At K2's scale (60 MoE layers x 384 experts) the per-rank view is the compact one.
EP_RANK_TOKENS = _counter("k2ray_ep_rank_tokens", "Tokens routed to each EP rank's experts (all MoE layers)",
                          *ENGINE_TAGS, RANK)
EP_RANK_IMBALANCE = _gauge("k2ray_ep_rank_imbalance", "Max over mean tokens per EP rank, last reported step",
                           *ENGINE_TAGS)

ALL_METRICS: tuple[MetricSpec, ...] = (
    REQUESTS, TTFT, ITL, TPOT, E2E, PROMPT_TOKENS, CACHED_TOKENS, OUTPUT_TOKENS, REASONING_TOKENS, SEARCHES,
    BILLED_MICRO_USD, BILLED_UNITS, LEDGER_WRITE_FAILURES, LEDGER_RECORDS_WRITTEN, LEDGER_LAG,
    RUNNING_REQUESTS, WAITING_REQUESTS, KV_BLOCKS_TOTAL, KV_BLOCKS_USED, KV_BLOCKS_FREE, KV_BLOCKS_CACHED,
    PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, PREEMPTIONS, ENGINE_PROMPT_TOKENS, ENGINE_GENERATION_TOKENS,
    KV_TRANSFER_BYTES, KV_TRANSFER_SECONDS, PD_LOCAL_PREFILLS, PD_PREFILL_RETRIES, QUEUE_SECONDS,
    EXPERT_TOKENS, EXPERT_IMBALANCE, EP_RANK_TOKENS, EP_RANK_IMBALANCE,
)

# Ray Serve's own series that the rules use (not k2ray's; the controller exports them).
RAY_SERVE_SERIES = frozenset({"ray_serve_deployment_replica_healthy"})


def series_names(spec: MetricSpec) -> frozenset[str]:
    """The names Prometheus scrapes for `spec` from Ray's exporter."""
    base = RAY_EXPORT_PREFIX + spec.name
    if spec.kind == "counter":
        return frozenset({f"{base}_total"})
    if spec.kind == "histogram":
        return frozenset({f"{base}_bucket", f"{base}_sum", f"{base}_count"})
    return frozenset({base})


def all_series_names() -> frozenset[str]:
    return frozenset().union(*(series_names(spec) for spec in ALL_METRICS))
