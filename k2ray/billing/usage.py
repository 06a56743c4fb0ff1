"""Reading the ledger: totals per key (or across keys) with a per-day breakdown, in the API's shape."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import date
from typing import Any

import sqlalchemy as sa

from .prices import format_usd
from .schema import usage


@dataclass(frozen=True)
class UsageTotals:
    """Sums over usage records; input_tokens counts uncached prompt tokens only."""

    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    web_searches: int = 0
    cost_pico_usd: int = 0

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cost_pico_usd"}
        out["cost_usd"] = format_usd(self.cost_pico_usd)
        return out


@dataclass(frozen=True)
class UsageReport:
    """`totals` plus one entry per UTC day that has records, oldest first."""

    totals: UsageTotals
    days: tuple[tuple[str, UsageTotals], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"totals": self.totals.to_dict(),
                "days": [{"day": day, **totals.to_dict()} for day, totals in self.days]}


# Summed per group in SQL (one day of one key never overflows a 64-bit integer of pico-USD:
# that is $9.2M), totalled in Python where integers are unbounded.
_SUMS = (
    sa.func.count().label("requests"),
    sa.func.sum(usage.c.num_uncached_tokens).label("input_tokens"),
    sa.func.sum(usage.c.num_cached_tokens).label("cached_tokens"),
    sa.func.sum(usage.c.num_completion_tokens).label("output_tokens"),
    sa.func.sum(usage.c.num_reasoning_tokens).label("reasoning_tokens"),
    sa.func.sum(usage.c.num_web_searches).label("web_searches"),
    sa.func.sum(usage.c.total_pico_usd).label("cost_pico_usd"),
)


def _totals(row: sa.Row) -> UsageTotals:
    # PostgreSQL's SUM(bigint) is numeric (a Decimal here): back to int, exactly.
    return UsageTotals(**{f.name: int(getattr(row, f.name) or 0) for f in fields(UsageTotals)})


def _where(query: sa.Select, key_id: str | None, since: date | None, until: date | None) -> sa.Select:
    if key_id is not None:
        query = query.where(usage.c.key_id == key_id)
    if since is not None:
        query = query.where(usage.c.day >= since.isoformat())
    if until is not None:
        query = query.where(usage.c.day <= until.isoformat())
    return query


def read_report(conn: sa.Connection, key_id: str | None, since: date | None, until: date | None) -> UsageReport:
    query = _where(sa.select(usage.c.day, *_SUMS), key_id, since, until).group_by(usage.c.day)
    days = tuple((row.day, _totals(row)) for row in conn.execute(query.order_by(usage.c.day)))
    return UsageReport(totals=sum((t for _, t in days), UsageTotals()), days=days)


def read_per_key(conn: sa.Connection, since: date | None, until: date | None) -> dict[str, UsageTotals]:
    query = _where(sa.select(usage.c.key_id, usage.c.day, *_SUMS), None, since, until)
    per_key: dict[str, UsageTotals] = {}
    for row in conn.execute(query.group_by(usage.c.key_id, usage.c.day)):
        per_key[row.key_id] = per_key.get(row.key_id, UsageTotals()) + _totals(row)
    return dict(sorted(per_key.items()))
