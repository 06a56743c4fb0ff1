"""Billing metrics: billed units and micro-USD per meter (no key label), and the ledger writer's failures and
lag through its observer hook."""

from __future__ import annotations

from collections.abc import Sequence

from k2ray.billing import (
    BUILTIN_PLANS,
    Ledger,
    LedgerWriter,
    RequestStatus,
    UsageCounts,
    UsageRecord,
    WriterConfig,
    meter_request,
    now_ms,
)
from k2ray.billing.prices import PICO_PER_MICRO
from k2ray.serve.metrics import RouterMetrics

from .recording import RecordingFactory

MODEL = "kimi-k2-thinking"
NEVER_S = 3600.0  # no interval flush while the test looks
FINISHED_AGO_MS = 5_000


def make_record(request_id: str, *, prompt: int = 100, cached: int = 40, completion: int = 10,
                searches: int = 0) -> UsageRecord:
    counts = UsageCounts(num_prompt_tokens=prompt, num_cached_tokens=cached, num_completion_tokens=completion,
                         num_web_searches=searches)
    finished = now_ms() - FINISHED_AGO_MS
    return meter_request(request_id=request_id, key_id="key-a", model_id=MODEL, plan_name="evolink",
                         plan=BUILTIN_PLANS["evolink"], counts=counts, status=RequestStatus.OK,
                         started_at_ms=finished - 500, finished_at_ms=finished)


class FlakyLedger(Ledger):
    """The real ledger whose next `num_failures_left` writes raise."""

    def __init__(self, ledger: Ledger, num_failures: int) -> None:
        super().__init__(ledger.engine)
        self.num_failures_left = num_failures

    def write(self, records: Sequence[UsageRecord]) -> None:
        if self.num_failures_left:
            self.num_failures_left -= 1
            raise ConnectionError("database unavailable (injected)")
        super().write(records)


def test_billed_units_and_micro_usd_by_meter_and_model():
    factory = RecordingFactory()
    record = make_record("r0", prompt=100, cached=40, completion=10, searches=2)
    RouterMetrics(factory).record_billed(record)
    units = {meter: factory.value("k2ray_billed_units", meter=meter, model=MODEL)
             for meter in ("input", "cached_input", "output", "web_search")}
    assert units == {"input": 60, "cached_input": 40, "output": 10, "web_search": 2}
    assert factory.total("k2ray_billed_micro_usd") * PICO_PER_MICRO == record.costs.total_pico_usd
    assert all("key" not in key for labels in factory.metrics["k2ray_billed_micro_usd"].values for key, _ in labels)


def test_ledger_write_failures_and_lag_reach_the_metrics(tmp_path):
    factory = RecordingFactory()
    ledger = FlakyLedger(Ledger.open(str(tmp_path / "ledger.db")), num_failures=2)
    config = WriterConfig(max_batch_records=3, flush_interval_s=NEVER_S, retry_interval_s=0.01)
    writer = LedgerWriter(ledger, config, RouterMetrics(factory))
    for i in range(3):
        writer.submit(make_record(f"r{i}"))
    assert writer.flush(timeout_s=30)
    writer.close()
    assert factory.total("k2ray_ledger_write_failures") == 2
    assert factory.total("k2ray_ledger_records_written") == 3 == writer.num_written
    assert factory.total("k2ray_ledger_lag_seconds") >= FINISHED_AGO_MS / 1000  # how late the records landed
