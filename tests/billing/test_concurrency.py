"""Two routers (two Ledger instances, each with its batching writer) and many request threads on one database."""

from __future__ import annotations

import random
import threading

from k2ray.billing import LATEST_VERSION, Ledger, LedgerWriter, UsageTotals, WriterConfig
from k2ray.billing.migrations import applied_versions

from .test_ledger import make_record

NUM_REQUESTS = 600
NUM_THREADS_PER_ROUTER = 4
NUM_DUPLICATE_WRITES = 3  # each request id is submitted this many times, to either router
BATCH = 16


def _expected_record(i: int):
    rng = random.Random(i)
    prompt = rng.randrange(1, 200_000)
    completion = rng.randrange(0, 30_000)
    return make_record(f"req-{i:05d}", key_id=f"key-{i % 3}", day=i % 4, prompt=prompt,
                       cached=rng.randrange(0, prompt + 1), completion=completion,
                       reasoning=rng.randrange(0, completion + 1), searches=rng.randrange(0, 3),
                       plan=rng.choice(["evolink", "moonshot", "moonshot-turbo"]))


def test_many_writers_on_two_ledgers_keep_one_record_per_request(ledger_dsn: str) -> None:
    expected = [_expected_record(i) for i in range(NUM_REQUESTS)]
    ledgers = [Ledger.open(ledger_dsn), Ledger.open(ledger_dsn)]
    writers = [LedgerWriter(ledger, WriterConfig(max_batch_records=BATCH, flush_interval_s=0.01))
               for ledger in ledgers]
    submissions = [(writer_index, record) for record in expected for writer_index in (0, 1, 0)]
    assert len(submissions) == NUM_DUPLICATE_WRITES * NUM_REQUESTS
    random.Random(0).shuffle(submissions)
    num_threads = NUM_THREADS_PER_ROUTER * len(writers)
    start = threading.Barrier(num_threads)

    def submit_share(thread_index: int) -> None:
        start.wait()
        for writer_index, record in submissions[thread_index::num_threads]:
            writers[writer_index].submit(record)

    threads = [threading.Thread(target=submit_share, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for writer in writers:
        writer.close()

    report = ledgers[1].report()
    assert report.totals.requests == NUM_REQUESTS
    assert report.totals == UsageTotals(
        requests=NUM_REQUESTS,
        input_tokens=sum(r.counts.num_uncached_tokens for r in expected),
        cached_tokens=sum(r.counts.num_cached_tokens for r in expected),
        output_tokens=sum(r.counts.num_completion_tokens for r in expected),
        reasoning_tokens=sum(r.counts.num_reasoning_tokens for r in expected),
        web_searches=sum(r.counts.num_web_searches for r in expected),
        cost_pico_usd=sum(r.costs.total_pico_usd for r in expected))
    for record in expected[:: NUM_REQUESTS // 20]:
        assert ledgers[0].get(record.request_id) == record
    per_key = ledgers[0].totals_per_key()
    assert sum(per_key.values(), UsageTotals()) == report.totals
    for ledger in ledgers:
        ledger.close()


def _open_together(dsn: str, num_routers: int) -> tuple[list[Ledger], list[BaseException]]:
    start = threading.Barrier(num_routers)
    ledgers: list[Ledger] = []
    errors: list[BaseException] = []

    def open_ledger() -> None:
        start.wait()
        try:
            ledgers.append(Ledger.open(dsn))
        except BaseException as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=open_ledger) for _ in range(num_routers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return ledgers, errors


def test_routers_starting_together_migrate_once(ledger_dsn: str) -> None:
    num_routers = 4
    ledgers, errors = _open_together(ledger_dsn, num_routers)
    assert errors == [] and len(ledgers) == num_routers
    with ledgers[0].engine.connect() as conn:
        assert applied_versions(conn) == list(range(1, LATEST_VERSION + 1))
    for ledger in ledgers:
        ledger.close()


def test_routers_creating_one_sqlite_file_together_never_see_it_locked(tmp_path) -> None:
    # Switching a new file to WAL skips SQLite's busy handler; one try in five hit "database is locked"
    # before the ledger retried it, so this repeats the race on fresh files.
    num_rounds, num_routers = 20, 4
    for i in range(num_rounds):
        ledgers, errors = _open_together(str(tmp_path / f"ledger-{i}.db"), num_routers)
        for ledger in ledgers:
            ledger.close()
        assert errors == [], f"round {i}"
