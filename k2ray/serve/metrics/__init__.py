"""k2ray's Prometheus metrics, exported through Ray's metrics port (names in `catalog`)."""

from .catalog import ALL_METRICS, LATENCY_BUCKETS_S, MetricSpec, all_series_names, series_names
from .engine_metrics import EngineMetricsRelay, ExpertMetrics
from .pd_metrics import PDMetrics
from .router_metrics import ChoiceTimer, RequestObservation, RouterMetrics

__all__ = [
    "ALL_METRICS", "LATENCY_BUCKETS_S", "ChoiceTimer", "EngineMetricsRelay", "ExpertMetrics", "MetricSpec",
    "PDMetrics", "RequestObservation", "RouterMetrics", "all_series_names", "series_names",
]
