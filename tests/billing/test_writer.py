from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from k2ray.billing import Ledger, LedgerWriteError, LedgerWriter, UsageRecord, WriterConfig

from .test_ledger import make_record

# Long enough that nothing is flushed on the interval while the test looks.
NEVER_S = 3600.0


class CountingLedger(Ledger):
    """The real ledger, counting its write calls; `num_failures_left` makes the next writes raise."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger.engine)
        self.batch_sizes: list[int] = []
        self.num_failures_left = 0
        self.wrote = threading.Event()

    def write(self, records: Sequence[UsageRecord]) -> None:
        if self.num_failures_left:
            self.num_failures_left -= 1
            raise ConnectionError("database unavailable (injected)")
        super().write(records)
        self.batch_sizes.append(len(records))
        self.wrote.set()


@pytest.fixture
def ledger(tmp_path) -> CountingLedger:
    return CountingLedger(Ledger.open(str(tmp_path / "ledger.db")))


def test_batches_fill_to_size_and_close_writes_the_rest(ledger: CountingLedger) -> None:
    writer = LedgerWriter(ledger, WriterConfig(max_batch_records=4, flush_interval_s=NEVER_S))
    for i in range(10):
        writer.submit(make_record(f"r{i}"))
    writer.close()
    assert ledger.batch_sizes == [4, 4, 2]
    assert ledger.report().totals.requests == 10 == writer.num_written
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(make_record("late"))


def test_a_partial_batch_is_written_on_the_interval(ledger: CountingLedger) -> None:
    writer = LedgerWriter(ledger, WriterConfig(max_batch_records=100, flush_interval_s=0.05))
    writer.submit(make_record("r0"))
    writer.submit(make_record("r1"))
    assert ledger.wrote.wait(timeout=30)
    assert ledger.batch_sizes == [2]
    writer.close()


def test_flush_waits_for_everything_submitted(ledger: CountingLedger) -> None:
    writer = LedgerWriter(ledger, WriterConfig(max_batch_records=100, flush_interval_s=NEVER_S))
    for i in range(7):
        writer.submit(make_record(f"r{i}"))
    assert writer.flush(timeout_s=30)
    assert ledger.report().totals.requests == 7
    writer.close()


def test_failed_writes_are_retried_without_losing_records(ledger: CountingLedger) -> None:
    ledger.num_failures_left = 2
    writer = LedgerWriter(ledger, WriterConfig(max_batch_records=3, flush_interval_s=NEVER_S,
                                               retry_interval_s=0.01))
    for i in range(5):
        writer.submit(make_record(f"r{i}"))
    assert writer.flush(timeout_s=30)
    writer.close()
    assert ledger.num_failures_left == 0
    assert ledger.report().totals.requests == 5


def test_close_reports_records_it_could_not_write(ledger: CountingLedger) -> None:
    ledger.num_failures_left = 10**6
    writer = LedgerWriter(ledger, WriterConfig(max_batch_records=100, flush_interval_s=NEVER_S,
                                               retry_interval_s=0.01, num_close_attempts=2))
    writer.submit(make_record("r0"))
    with pytest.raises(LedgerWriteError, match="1 usage records"):
        writer.close()


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        WriterConfig(max_batch_records=0)
    with pytest.raises(ValueError):
        WriterConfig(flush_interval_s=0)
