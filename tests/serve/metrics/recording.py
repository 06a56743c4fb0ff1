"""A metric factory that keeps what was recorded, for unit tests (the serving path uses Ray's metrics)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from k2ray.serve.metrics import MetricSpec

Tags = tuple[tuple[str, str], ...]


@dataclass
class RecordedMetric:
    spec: MetricSpec
    values: dict[Tags, float] = field(default_factory=lambda: defaultdict(float))  # counter sums / gauge levels
    observations: dict[Tags, list[float]] = field(default_factory=lambda: defaultdict(list))

    def _key(self, tags: dict[str, str] | None) -> Tags:
        tags = tags or {}
        assert set(tags) == set(self.spec.tag_keys), f"{self.spec.name}: tags {sorted(tags)}"
        return tuple(sorted(tags.items()))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "counter" and value > 0, (self.spec.name, value)
        self.values[self._key(tags)] += value

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "gauge", self.spec.name
        self.values[self._key(tags)] = value

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "histogram" and value >= 0, (self.spec.name, value)
        self.observations[self._key(tags)].append(value)


class RecordingFactory:
    def __init__(self) -> None:
        self.metrics: dict[str, RecordedMetric] = {}

    def __call__(self, spec: MetricSpec) -> RecordedMetric:
        return self.metrics.setdefault(spec.name, RecordedMetric(spec))

    def value(self, name: str, **tags: str) -> float:
        return self.metrics[name].values.get(tuple(sorted(tags.items())), 0.0)

    def total(self, name: str) -> float:
        return sum(self.metrics[name].values.values())

    def observations(self, name: str, **tags: str) -> list[float]:
        return self.metrics[name].observations.get(tuple(sorted(tags.items())), [])
