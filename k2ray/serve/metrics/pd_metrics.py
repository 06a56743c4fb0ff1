"""Disaggregated prefill/decode metrics, recorded by the pool that does the work (label `pool`)."""

from __future__ import annotations

from . import catalog
from .ray_metrics import MetricFactory, build


class PDMetrics:
    """`k2ray_kv_transfer_bytes_total`, `k2ray_kv_transfer_seconds`, `k2ray_pd_local_prefills_total`,
    `k2ray_pd_prefill_retries_total` and `k2ray_queue_seconds` (scraped with Ray's `ray_` prefix)."""

    def __init__(self, pool: str, factory: MetricFactory = build) -> None:
        self._tags = {catalog.POOL: pool}
        self._transfer_bytes = factory(catalog.KV_TRANSFER_BYTES)
        self._transfer_seconds = factory(catalog.KV_TRANSFER_SECONDS)
        self._local_prefills = factory(catalog.PD_LOCAL_PREFILLS)
        self._prefill_retries = factory(catalog.PD_PREFILL_RETRIES)
        self._queue_seconds = factory(catalog.QUEUE_SECONDS)

    def kv_transferred(self, num_bytes: int, seconds: float) -> None:
        """One request's KV moved between pools."""
        if num_bytes > 0:
            self._transfer_bytes.inc(num_bytes, tags=self._tags)
        self._transfer_seconds.observe(seconds, tags=self._tags)

    def local_prefill(self) -> None:
        """A prompt prefilled where it decodes (no prefill replica, or too short to be worth moving)."""
        self._local_prefills.inc(tags=self._tags)

    def prefill_retry(self) -> None:
        self._prefill_retries.inc(tags=self._tags)

    def queued(self, seconds: float) -> None:
        """How long a request waited in this pool before it started."""
        self._queue_seconds.observe(seconds, tags=self._tags)
