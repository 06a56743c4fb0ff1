"""The engine core's stats, relayed by its replica into Ray metrics.

The engine core is a plain process, not a Ray worker, so it cannot export metrics itself; its replica polls
`stats()` (a dict of ints) and hands it to `EngineMetricsRelay.update`. Levels (running, waiting, KV
blocks) become gauges. Monotone totals (prefix-cache queries and hits, preemptions, tokens) become counter
increments of their growth since the previous update, so a total is never counted twice however often
the replica polls; a total that went down means a restarted core, whose whole new total is then counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import catalog
from .catalog import MetricSpec
from .ray_metrics import MetricFactory, build

# Engine stats key of a monotone total -> the counter it feeds (keys absent from a stats dict are skipped).
TOTAL_COUNTERS: dict[str, MetricSpec] = {
    "prefix_cache_queries": catalog.PREFIX_CACHE_QUERIES,
    "prefix_cache_hits": catalog.PREFIX_CACHE_HITS,
    "num_preemptions": catalog.PREEMPTIONS,
    "num_prompt_tokens": catalog.ENGINE_PROMPT_TOKENS,
    "num_generation_tokens": catalog.ENGINE_GENERATION_TOKENS,
}
# Engine stats key of a level -> its gauge.
LEVEL_GAUGES: dict[str, MetricSpec] = {
    "num_running": catalog.RUNNING_REQUESTS,
    "num_waiting": catalog.WAITING_REQUESTS,
    "num_total_blocks": catalog.KV_BLOCKS_TOTAL,
    "num_free_blocks": catalog.KV_BLOCKS_FREE,
    "num_cached_blocks": catalog.KV_BLOCKS_CACHED,
}


class TotalDeltas:
    """Growth of named monotone totals between successive readings."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def delta(self, key: str, total: int) -> int:
        last = self._last.get(key, 0)
        self._last[key] = total
        return total if total < last else total - last  # went down: a new core counting from zero


class EngineMetricsRelay:
    """One engine replica's metrics, labelled with its pool and replica."""

    def __init__(self, pool: str, replica: str, factory: MetricFactory = build) -> None:
        self._tags = {catalog.POOL: pool, catalog.REPLICA: replica}
        self._deltas = TotalDeltas()
        self._metrics = {spec.name: factory(spec) for spec in (*TOTAL_COUNTERS.values(), *LEVEL_GAUGES.values(),
                                                              catalog.KV_BLOCKS_USED)}

    def update(self, stats: Mapping[str, int]) -> None:
        """Relay one reading of the engine core's `stats()`."""
        for key, spec in LEVEL_GAUGES.items():
            if key in stats:
                self._metrics[spec.name].set(stats[key], tags=self._tags)
        if "num_total_blocks" in stats and "num_free_blocks" in stats:
            num_used = stats["num_total_blocks"] - stats["num_free_blocks"]
            self._metrics[catalog.KV_BLOCKS_USED.name].set(num_used, tags=self._tags)
        for key, spec in TOTAL_COUNTERS.items():
            if key not in stats:
                continue
            delta = self._deltas.delta(key, stats[key])
            if delta > 0:  # Ray counters take positive increments only
                self._metrics[spec.name].inc(delta, tags=self._tags)


class ExpertMetrics:
    """Tokens routed per expert and per EP rank, and their imbalance, for an engine replica of a MoE model."""

    def __init__(self, pool: str, replica: str, factory: MetricFactory = build) -> None:
        self._pool = pool
        self._tags = {catalog.POOL: pool, catalog.REPLICA: replica}
        self._tokens = factory(catalog.EXPERT_TOKENS)
        self._imbalance = factory(catalog.EXPERT_IMBALANCE)
        self._rank_tokens = factory(catalog.EP_RANK_TOKENS)
        self._rank_imbalance = factory(catalog.EP_RANK_IMBALANCE)
        self._last: dict[str, list[int]] = {}

    def update(self, stats: Mapping[str, Any]) -> None:
        """Relay one reading of the core's (or an EP group's) `stats()`: the growth of its per-expert and
        per-rank totals since the previous reading (a total that went down is a restarted core's, counted
        whole)."""
        reports = [rank["expert_load"] for rank in stats.get("ranks", [stats]) if rank.get("expert_load")]
        if not reports:
            return  # a model without routed experts
        self.record(self._growth("expert", _column_sums(reports, "tokens_per_expert")))
        per_rank = self._growth("rank", _column_sums(reports, "tokens_per_rank"))
        for rank, num_tokens in enumerate(per_rank):
            if num_tokens > 0:
                self._rank_tokens.inc(num_tokens, tags={**self._tags, catalog.RANK: str(rank)})
        if (imbalance := _max_over_mean(per_rank)) is not None:
            self._rank_imbalance.set(imbalance, tags=self._tags)

    def record(self, num_tokens_per_expert: Sequence[int]) -> None:
        """Tokens routed to each expert (index = expert id) since the previous report."""
        for expert, num_tokens in enumerate(num_tokens_per_expert):
            if num_tokens > 0:
                self._tokens.inc(num_tokens, tags={catalog.POOL: self._pool, catalog.EXPERT: str(expert)})
        if (imbalance := _max_over_mean(num_tokens_per_expert)) is not None:
            self._imbalance.set(imbalance, tags=self._tags)

    def _growth(self, key: str, totals: list[int]) -> list[int]:
        last, self._last[key] = self._last.get(key), totals
        if last is None or len(last) != len(totals) or any(t < p for t, p in zip(totals, last, strict=True)):
            return totals
        return [t - p for t, p in zip(totals, last, strict=True)]


def _column_sums(reports: Sequence[Mapping[str, Any]], key: str) -> list[int]:
    """[MoE layer][column] tables of every report summed over layers and reports (an EP group's ranks
    each count the routing of their own tokens)."""
    rows = [row for report in reports for row in report[key]]
    return [sum(column) for column in zip(*rows, strict=True)]


def _max_over_mean(counts: Sequence[int]) -> float | None:
    total = sum(counts)
    return max(counts) * len(counts) / total if total > 0 else None
