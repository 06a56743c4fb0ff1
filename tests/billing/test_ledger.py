from __future__ import annotations

from datetime import date

import pytest
import sqlalchemy as sa

from k2ray.billing import (
    BUILTIN_PLANS,
    LATEST_VERSION,
    Ledger,
    RequestStatus,
    UsageCounts,
    UsageTotals,
    meter_request,
    migrate,
)
from k2ray.billing.db import engine_url, make_engine
from k2ray.billing.schema import schema_versions

DAY_MS = 86_400_000
DEC_1_MS = 1_764_547_200_000  # 2025-12-01T00:00:00Z


def make_record(request_id: str, key_id: str = "key-a", *, day: int = 0, prompt: int = 100, cached: int = 40,
                completion: int = 10, reasoning: int = 4, searches: int = 0, plan: str = "evolink"):
    counts = UsageCounts(num_prompt_tokens=prompt, num_cached_tokens=cached, num_completion_tokens=completion,
                         num_reasoning_tokens=reasoning, num_web_searches=searches)
    finished = DEC_1_MS + day * DAY_MS + 1_000
    return meter_request(request_id=request_id, key_id=key_id, model_id="kimi-k2-thinking", plan_name=plan,
                         plan=BUILTIN_PLANS[plan], counts=counts, status=RequestStatus.OK,
                         started_at_ms=finished - 500, finished_at_ms=finished)


def test_migrations_apply_once_in_order(ledger_dsn: str) -> None:
    ledger = Ledger.open(ledger_dsn)
    assert migrate(ledger.engine) == []  # a second router finds the schema up to date
    with ledger.engine.connect() as conn:
        versions = [row.version for row in conn.execute(sa.select(schema_versions.c.version))]
    assert versions == list(range(1, LATEST_VERSION + 1))
    ledger.close()


def test_a_second_write_of_a_request_id_changes_nothing(ledger_dsn: str) -> None:
    ledger = Ledger.open(ledger_dsn)
    first = make_record("req-1", prompt=100)
    ledger.write([first, make_record("req-1", prompt=999)])  # duplicate inside one batch
    ledger.write([make_record("req-1", prompt=5000, searches=2), make_record("req-2")])  # and across batches
    assert ledger.get("req-1") == first
    assert ledger.get("missing") is None
    assert ledger.report().totals.requests == 2
    ledger.close()


def test_report_sums_per_key_and_per_day_exactly(ledger_dsn: str) -> None:
    ledger = Ledger.open(ledger_dsn)
    records = [make_record("a1", day=0), make_record("a2", day=0, searches=2),
               make_record("a3", day=1, prompt=1_000_000, cached=999_999, completion=0, reasoning=0),
               make_record("b1", key_id="key-b", day=1, plan="moonshot-turbo")]
    ledger.write(records)
    report = ledger.report("key-a")
    assert [day for day, _ in report.days] == ["2025-12-01", "2025-12-02"]
    day1 = report.days[0][1]
    assert day1 == UsageTotals(requests=2, input_tokens=120, cached_tokens=80, output_tokens=20, reasoning_tokens=8,
                               web_searches=2, cost_pico_usd=records[0].costs.total_pico_usd
                               + records[1].costs.total_pico_usd)
    # a1 and a2: 2 x (60 x 556,000 + 40 x 139,000 + 10 x 2,222,000) pico, a2 adds 2 x $0.004
    assert day1.to_dict()["cost_usd"] == "0.00812228"
    # a3: 1 uncached + 999,999 cache hits at evolink
    assert report.days[1][1].to_dict() == {"requests": 1, "input_tokens": 1, "cached_tokens": 999_999,
                                           "output_tokens": 0, "reasoning_tokens": 0, "web_searches": 0,
                                           "cost_usd": "0.139000417"}
    assert report.to_dict()["totals"]["cost_usd"] == "0.147122697"
    assert ledger.spent_pico_usd("key-a") == 147_122_697_000
    # b1 at turbo: 60 x 1.15 + 40 x 0.15 + 10 x 8.00 micro-USD
    assert ledger.report("key-b").to_dict()["totals"]["cost_usd"] == "0.000155"
    everyone = ledger.report()
    assert everyone.totals == report.totals + ledger.report("key-b").totals
    assert ledger.totals_per_key() == {"key-a": report.totals, "key-b": ledger.report("key-b").totals}
    since = ledger.report("key-a", since=date(2025, 12, 2))
    assert since.totals == report.days[1][1]
    assert ledger.report("key-a", until=date(2025, 12, 1)).totals == day1
    assert ledger.report("nobody").to_dict() == {"totals": UsageTotals().to_dict(), "days": []}
    ledger.close()


def test_totals_beyond_a_64_bit_day_sum_stay_exact(ledger_dsn: str) -> None:
    # Each row holds ~$8,000 (8e15 pico); 2,000 rows on 2 days sum past 2^63 pico overall but not per day.
    ledger = Ledger.open(ledger_dsn)
    big = [make_record(f"r{i}", day=i % 2, prompt=0, cached=0, completion=10**9, reasoning=0, plan="moonshot-turbo")
           for i in range(2_000)]
    ledger.write(big)
    totals = ledger.report().totals
    assert totals.cost_pico_usd == 2_000 * 10**9 * 8_000_000 > 2**63
    assert totals.to_dict()["cost_usd"] == "16000000"
    ledger.close()


@pytest.mark.parametrize(("dsn", "url"), [
    ("/var/lib/k2ray/ledger.db", "sqlite:////var/lib/k2ray/ledger.db"),
    ("ledger.db", "sqlite:///ledger.db"),
    ("sqlite:///x.db", "sqlite:///x.db"),
    ("postgresql://u:p@db:5432/k2ray", "postgresql+psycopg://u:p@db:5432/k2ray"),
    ("postgres://db/k2ray", "postgresql+psycopg://db/k2ray"),
    ("postgresql+psycopg://db/k2ray", "postgresql+psycopg://db/k2ray"),
])
def test_dsns_name_sqlite_files_or_postgres_through_psycopg3(dsn: str, url: str) -> None:
    assert engine_url(dsn) == url


@pytest.mark.parametrize("dsn", ["sqlite://", "sqlite:///:memory:", "mysql://db/k2ray"])
def test_unusable_ledgers_are_refused(dsn: str) -> None:
    with pytest.raises(ValueError, match="ledger"):
        make_engine(dsn)


def test_sqlite_ledger_runs_in_wal_mode(tmp_path) -> None:
    ledger = Ledger.open(str(tmp_path / "ledger.db"))
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    ledger.close()
