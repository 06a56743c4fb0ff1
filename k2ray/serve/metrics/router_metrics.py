"""The router's metrics: requests, their latencies and tokens as the client saw them, billing and the ledger.

One `RequestObservation` per HTTP request (from `RouterMetrics.start`), one `ChoiceTimer` per choice;
`finish` records the request once, whichever exit path calls it first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from k2ray.billing import UsageCounts, UsageRecord
from k2ray.billing.prices import PICO_PER_MICRO

from . import catalog
from .ray_metrics import MetricFactory, build

NO_MODEL = "none"  # the request never named a served model (bad body, unknown model, auth failure)
NO_FINISH = "none"  # a response without generation (count_tokens)
ERROR_FINISH = "error"
CANCELLED_FINISH = "cancelled"
CLIENT_CLOSED_STATUS = "499"  # a non-streamed request whose client left before the response
# When choices of one request end differently, the request is labelled with the most telling reason.
_FINISH_RANK = {ERROR_FINISH: 4, CANCELLED_FINISH: 3, "length": 2, "tool_calls": 1, "stop": 0}

Clock = Callable[[], float]


class RouterMetrics:
    def __init__(self, factory: MetricFactory = build, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        specs = (catalog.REQUESTS, catalog.TTFT, catalog.ITL, catalog.TPOT, catalog.E2E, catalog.PROMPT_TOKENS,
                 catalog.CACHED_TOKENS, catalog.OUTPUT_TOKENS, catalog.REASONING_TOKENS, catalog.SEARCHES,
                 catalog.BILLED_MICRO_USD, catalog.BILLED_UNITS, catalog.LEDGER_WRITE_FAILURES,
                 catalog.LEDGER_RECORDS_WRITTEN, catalog.LEDGER_LAG)
        self._recorders = {spec.name: factory(spec) for spec in specs}

    def start(self, route: str) -> RequestObservation:
        return RequestObservation(self, route, self.clock())

    def record_usage(self, model: str, usage: UsageCounts) -> None:
        tags = {catalog.MODEL: model}
        for spec, value in ((catalog.PROMPT_TOKENS, usage.num_prompt_tokens),
                            (catalog.CACHED_TOKENS, usage.num_cached_tokens),
                            (catalog.OUTPUT_TOKENS, usage.num_completion_tokens),
                            (catalog.REASONING_TOKENS, usage.num_reasoning_tokens),
                            (catalog.SEARCHES, usage.num_web_searches)):
            self._inc(spec, value, tags)

    def record_billed(self, record: UsageRecord) -> None:
        """A usage record as priced for the ledger: units and micro-USD per meter (never per key)."""
        counts, costs = record.counts, record.costs
        for meter, num_units, pico_usd in (
                ("input", counts.num_uncached_tokens, costs.input_pico_usd),
                ("cached_input", counts.num_cached_tokens, costs.cached_input_pico_usd),
                ("output", counts.num_completion_tokens, costs.output_pico_usd),
                ("web_search", counts.num_web_searches, costs.web_search_pico_usd)):
            tags = {catalog.METER: meter, catalog.MODEL: record.model_id}
            self._inc(catalog.BILLED_UNITS, num_units, tags)
            self._inc(catalog.BILLED_MICRO_USD, pico_usd / PICO_PER_MICRO, tags)

    # The ledger writer's observer (k2ray.billing.writer.WriterObserver); called on the writer's thread.
    def batch_written(self, num_records: int, lag_s: float) -> None:
        self._inc(catalog.LEDGER_RECORDS_WRITTEN, num_records, {})
        self._recorders[catalog.LEDGER_LAG.name].set(lag_s, tags={})

    def batch_failed(self, num_records: int, lag_s: float) -> None:
        self._inc(catalog.LEDGER_WRITE_FAILURES, 1, {})
        self._recorders[catalog.LEDGER_LAG.name].set(lag_s, tags={})

    def observe(self, spec: catalog.MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._recorders[spec.name].observe(value, tags=tags)

    def _inc(self, spec: catalog.MetricSpec, value: float, tags: dict[str, str]) -> None:
        if value > 0:  # Ray counters take positive increments only
            self._recorders[spec.name].inc(value, tags=tags)

    def count_request(self, tags: dict[str, str]) -> None:
        self._inc(catalog.REQUESTS, 1, tags)


class RequestObservation:
    """One HTTP request: its route, its model once known, its choices' timers; recorded once by `finish`."""

    def __init__(self, metrics: RouterMetrics, route: str, started_at: float) -> None:
        self._metrics = metrics
        self.route = route
        self.model = NO_MODEL
        self.started_at = started_at
        self._finish_reason: str | None = None
        self.is_finished = False

    def choice_timer(self) -> ChoiceTimer:
        return ChoiceTimer(self)

    def choice_finished(self, finish_reason: str) -> None:
        if self._finish_reason is None or _FINISH_RANK.get(finish_reason, 0) > _FINISH_RANK.get(self._finish_reason, 0):
            self._finish_reason = finish_reason

    def finish(self, status: int | str, finish_reason: str | None = None, usage: UsageCounts | None = None) -> None:
        """Record the request: HTTP `status`, `finish_reason` (default: what its choices reported)."""
        if self.is_finished:
            return
        self.is_finished = True
        metrics = self._metrics
        reason = finish_reason or self._finish_reason or NO_FINISH
        metrics.count_request({catalog.ROUTE: self.route, catalog.MODEL: self.model, catalog.STATUS: str(status),
                               catalog.FINISH_REASON: reason})
        metrics.observe(catalog.E2E, metrics.clock() - self.started_at,
                        {catalog.ROUTE: self.route, catalog.MODEL: self.model})
        if usage is not None:
            metrics.record_usage(self.model, usage)

    @property
    def router_metrics(self) -> RouterMetrics:
        return self._metrics


class ChoiceTimer:
    """TTFT (from request arrival), ITL (per token: a delta of k tokens after a gap g counts k gaps of g/k)
    and TPOT of one choice, fed with the number of tokens of each engine delta."""

    def __init__(self, request: RequestObservation) -> None:
        self._request = request
        self._first_at: float | None = None
        self._last_at = 0.0
        self._num_tokens = 0

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        metrics = self._request.router_metrics
        now = metrics.clock()
        tags = {catalog.MODEL: self._request.model}
        if self._first_at is None:  # tokens that came with the first one have no gap to measure
            self._first_at = now
            metrics.observe(catalog.TTFT, now - self._request.started_at, tags)
        else:
            gap = (now - self._last_at) / num_tokens
            for _ in range(num_tokens):
                metrics.observe(catalog.ITL, gap, tags)
        self._last_at = now
        self._num_tokens += num_tokens

    def on_finish(self, finish_reason: str) -> None:
        if self._first_at is not None and self._num_tokens > 1:
            tpot = (self._last_at - self._first_at) / (self._num_tokens - 1)
            self._request.router_metrics.observe(catalog.TPOT, tpot, {catalog.MODEL: self._request.model})
        self._request.choice_finished(finish_reason)
