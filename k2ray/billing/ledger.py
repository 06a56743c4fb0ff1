"""The usage ledger: idempotent writes of usage records keyed by request id, and totals read back."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

import sqlalchemy as sa

from .db import insert_ignoring_duplicates, make_engine
from .meter import Costs, RequestStatus, UsageCounts, UsageRecord
from .migrations import migrate
from .schema import usage
from .usage import UsageReport, UsageTotals, read_per_key, read_report

_COUNT_COLUMNS = ("num_prompt_tokens", "num_cached_tokens", "num_completion_tokens",
                  "num_reasoning_tokens", "num_web_searches")
_COST_COLUMNS = ("input_pico_usd", "cached_input_pico_usd", "output_pico_usd", "web_search_pico_usd")


def _row(record: UsageRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id, "key_id": record.key_id, "model_id": record.model_id,
        "plan": record.plan, "status": record.status.value,
        **{name: getattr(record.counts, name) for name in _COUNT_COLUMNS},
        "num_uncached_tokens": record.counts.num_uncached_tokens,
        **{name: getattr(record.costs, name) for name in _COST_COLUMNS},
        "total_pico_usd": record.costs.total_pico_usd,
        "started_at_ms": record.started_at_ms, "finished_at_ms": record.finished_at_ms, "day": record.day,
    }


def _record(row: sa.Row) -> UsageRecord:
    return UsageRecord(
        request_id=row.request_id, key_id=row.key_id, model_id=row.model_id, plan=row.plan,
        status=RequestStatus(row.status),
        counts=UsageCounts(**{name: getattr(row, name) for name in _COUNT_COLUMNS}),
        costs=Costs(**{name: getattr(row, name) for name in _COST_COLUMNS}),
        started_at_ms=row.started_at_ms, finished_at_ms=row.finished_at_ms)


class Ledger:
    """One process's handle on the ledger database; many may share one database (router replicas)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, dsn: str) -> Ledger:
        """Connect (SQLite file path or URL, or postgresql://...) and bring the schema up to date."""
        engine = make_engine(dsn)
        migrate(engine)
        return cls(engine)

    def write(self, records: Sequence[UsageRecord]) -> None:
        """Insert records in one transaction; a request id already in the ledger is left as it is."""
        with self.engine.begin() as conn:
            insert_ignoring_duplicates(conn, usage, "request_id", (_row(r) for r in records))

    def get(self, request_id: str) -> UsageRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(usage).where(usage.c.request_id == request_id)).first()
        return None if row is None else _record(row)

    def report(self, key_id: str | None = None, since: date | None = None,
               until: date | None = None) -> UsageReport:
        """Totals and per-day breakdown for one key, or across all keys with key_id=None (admin)."""
        with self.engine.connect() as conn:
            return read_report(conn, key_id, since, until)

    def totals_per_key(self, since: date | None = None, until: date | None = None) -> dict[str, UsageTotals]:
        with self.engine.connect() as conn:
            return read_per_key(conn, since, until)

    def spent_pico_usd(self, key_id: str) -> int:
        """Everything a key has been billed, for its budget."""
        return self.report(key_id).totals.cost_pico_usd

    def close(self) -> None:
        self.engine.dispose()
