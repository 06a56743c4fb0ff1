"""The engine relay: stats levels as gauges, monotone totals as counter increments counted exactly once."""

from __future__ import annotations

from dataclasses import fields

from k2ray.engine.llm_engine import EngineStats
from k2ray.serve.metrics import EngineMetricsRelay, ExpertMetrics, PDMetrics
from k2ray.serve.metrics.engine_metrics import LEVEL_GAUGES, TOTAL_COUNTERS, TotalDeltas

from .recording import RecordingFactory

TAGS = {"pool": "decode", "replica": "r0"}


def _stats(**overrides: int) -> dict[str, int]:
    stats = {"num_free_blocks": 90, "num_total_blocks": 100, "num_running": 3, "num_waiting": 2,
             "prefix_cache_queries": 64, "prefix_cache_hits": 32}
    return {**stats, **overrides}


def test_the_engine_reports_every_stat_the_relay_exports():
    # The engine core sends asdict(EngineStats) (plus its own keys); a stat missing there is silently skipped.
    assert TOTAL_COUNTERS.keys() | LEVEL_GAUGES.keys() <= {f.name for f in fields(EngineStats)}


def test_levels_become_gauges_and_used_blocks_are_total_minus_free():
    factory = RecordingFactory()
    relay = EngineMetricsRelay("decode", "r0", factory)
    relay.update(_stats())
    relay.update(_stats(num_free_blocks=70, num_running=5, num_waiting=0))
    assert factory.value("k2ray_running_requests", **TAGS) == 5
    assert factory.value("k2ray_waiting_requests", **TAGS) == 0
    assert factory.value("k2ray_kv_blocks_free", **TAGS) == 70
    assert factory.value("k2ray_kv_blocks_used", **TAGS) == 30
    assert factory.value("k2ray_kv_blocks_total", **TAGS) == 100


def test_totals_are_counted_once_however_often_the_replica_polls():
    factory = RecordingFactory()
    relay = EngineMetricsRelay("decode", "r0", factory)
    for _ in range(3):  # the same reading three times adds nothing after the first
        relay.update(_stats())
    relay.update(_stats(prefix_cache_queries=100, prefix_cache_hits=48))
    assert factory.value("k2ray_prefix_cache_queries", **TAGS) == 100
    assert factory.value("k2ray_prefix_cache_hits", **TAGS) == 48


def test_optional_totals_are_relayed_when_the_engine_reports_them():
    factory = RecordingFactory()
    relay = EngineMetricsRelay("prefill", "r1", factory)
    relay.update(_stats())
    assert factory.total("k2ray_preemptions") == 0  # not reported: nothing recorded
    relay.update(_stats(num_preemptions=2, num_prompt_tokens=500, num_generation_tokens=7, num_cached_blocks=4))
    relay.update(_stats(num_preemptions=3, num_prompt_tokens=900, num_generation_tokens=9, num_cached_blocks=6))
    tags = {"pool": "prefill", "replica": "r1"}
    assert factory.value("k2ray_preemptions", **tags) == 3
    assert factory.value("k2ray_engine_prompt_tokens", **tags) == 900
    assert factory.value("k2ray_engine_generation_tokens", **tags) == 9
    assert factory.value("k2ray_kv_blocks_cached", **tags) == 6


def test_a_restarted_core_counts_its_new_total_from_zero():
    deltas = TotalDeltas()
    assert [deltas.delta("q", t) for t in (10, 25, 25, 4, 9)] == [10, 15, 0, 4, 5]


def test_replicas_keep_their_own_series():
    factory = RecordingFactory()
    first, second = EngineMetricsRelay("decode", "r0", factory), EngineMetricsRelay("decode", "r1", factory)
    first.update(_stats(prefix_cache_queries=10))
    second.update(_stats(prefix_cache_queries=7))
    first.update(_stats(prefix_cache_queries=12))
    assert factory.value("k2ray_prefix_cache_queries", pool="decode", replica="r0") == 12
    assert factory.value("k2ray_prefix_cache_queries", pool="decode", replica="r1") == 7


def test_pd_metrics_record_transfers_retries_local_prefills_and_queueing():
    factory = RecordingFactory()
    pd = PDMetrics("decode", factory)
    pd.kv_transferred(4096, 0.002)
    pd.kv_transferred(0, 0.0005)  # an empty transfer still takes time
    pd.local_prefill()
    pd.prefill_retry()
    pd.prefill_retry()
    pd.queued(0.25)
    assert factory.value("k2ray_kv_transfer_bytes", pool="decode") == 4096
    assert factory.observations("k2ray_kv_transfer_seconds", pool="decode") == [0.002, 0.0005]
    assert factory.value("k2ray_pd_local_prefills", pool="decode") == 1
    assert factory.value("k2ray_pd_prefill_retries", pool="decode") == 2
    assert factory.observations("k2ray_queue_seconds", pool="decode") == [0.25]


def test_expert_tokens_and_imbalance():
    factory = RecordingFactory()
    experts = ExpertMetrics("decode", "r0", factory)
    experts.record([6, 2, 0, 0])  # mean 2, max 6
    experts.record([0, 0, 0, 0])  # nothing routed: the last imbalance stands
    assert factory.value("k2ray_expert_tokens", pool="decode", expert="0") == 6
    assert factory.value("k2ray_expert_tokens", pool="decode", expert="2") == 0
    assert factory.value("k2ray_expert_imbalance", **TAGS) == 3.0


def expert_stats(*layers: list[int], ep_size: int = 2) -> dict:
    """Two experts per rank with ep_size 2 (4 experts): a rank's tokens are its experts' sum."""
    per_rank = [[sum(layer[r * 2:(r + 1) * 2]) for r in range(ep_size)] for layer in layers]
    return {"expert_load": {"tokens_per_expert": [list(layer) for layer in layers], "tokens_per_rank": per_rank}}


def test_expert_totals_are_relayed_as_growth_summed_over_layers_and_ranks():
    factory = RecordingFactory()
    experts = ExpertMetrics("decode", "r0", factory)
    experts.update({"num_running": 0})  # a model without routed experts: nothing
    assert factory.total("k2ray_expert_tokens") == 0
    experts.update(expert_stats([3, 1, 0, 0], [1, 1, 2, 0]))  # two MoE layers
    assert factory.value("k2ray_expert_tokens", pool="decode", expert="0") == 4
    group = {"ranks": [expert_stats([5, 1, 0, 0], [1, 1, 2, 0]), expert_stats([2, 0, 0, 0], [0, 0, 0, 4])]}
    experts.update(group)  # an EP group: totals 8, 2, 2, 4 against 4, 2, 2, 0 before
    assert factory.value("k2ray_expert_tokens", pool="decode", expert="0") == 8
    assert factory.value("k2ray_expert_tokens", pool="decode", expert="3") == 4
    assert factory.value("k2ray_expert_imbalance", **TAGS) == 2.0  # growth 4, 0, 0, 4: max 4 over mean 2
    assert factory.value("k2ray_ep_rank_tokens", rank="0", **TAGS) == 8 + 2  # experts 0 and 1, both reports
    assert factory.value("k2ray_ep_rank_tokens", rank="1", **TAGS) == 2 + 4
    assert factory.value("k2ray_ep_rank_imbalance", **TAGS) == 1.0  # growth: 4 on each rank
    experts.update(expert_stats([1, 0, 0, 0]))  # a restarted core: its total counted whole
    assert factory.value("k2ray_expert_tokens", pool="decode", expert="0") == 9
    assert factory.value("k2ray_ep_rank_imbalance", **TAGS) == 2.0  # 1 token, all on rank 0
