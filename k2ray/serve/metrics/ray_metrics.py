"""Ray metric objects from catalog specs (exported on the node's metrics port, which KubeRay scrapes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.util import metrics

from .catalog import MetricSpec

# spec -> an object with the Ray metric's `inc` / `set` / `observe(value, tags=...)` for its kind.
MetricFactory = Callable[[MetricSpec], Any]


def build(spec: MetricSpec) -> metrics.Metric:
    """A Ray metric for `spec`; creating the same name twice in one process shares one series set."""
    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries),
                             tag_keys=spec.tag_keys)
