"""Opening the ledger database: a DSN (or a bare file path) to a SQLAlchemy engine, SQLite or PostgreSQL."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

# A router waits this long for another writer's SQLite lock (WAL: one writer at a time) before erroring.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Between tries at switching a new file to WAL (see _enable_wal).
SQLITE_WAL_RETRY_S = 0.01
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def engine_url(dsn: str) -> str:
    """'postgresql://...' -> psycopg 3; a bare path -> a SQLite file; SQLAlchemy URLs pass through."""
    for scheme in POSTGRES_SCHEMES:
        if dsn.startswith(scheme):
            return "postgresql+psycopg://" + dsn.removeprefix(scheme)
    if "://" not in dsn:
        return f"sqlite:///{dsn}"
    return dsn


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    # Switching the journal mode needs an exclusive lock, and SQLite answers "database is locked" at once
    # there instead of calling the busy handler; routers opening one new file together retry until the
    # busy timeout, as they would wait on any other lock.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(SQLITE_WAL_RETRY_S)


def _setup_sqlite(engine: sa.Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and can't take the write lock up front; take it
    # ourselves (BEGIN IMMEDIATE) so that two routers on one file serialize instead of failing mid-way.
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(dsn: str) -> sa.Engine:
    url = engine_url(dsn)
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise ValueError("the ledger needs a file (or PostgreSQL): an in-memory SQLite is per connection")
        engine = sa.create_engine(url)
        _setup_sqlite(engine)
        return engine
    if url.startswith("postgresql"):
        return sa.create_engine(url, pool_pre_ping=True)
    raise ValueError(f"unsupported ledger DSN {dsn!r}: use a SQLite file path or postgresql://...")


def insert_ignoring_duplicates(conn: sa.Connection, table: sa.Table, key: str,
                               rows: Iterable[Mapping[str, Any]]) -> None:
    """INSERT ... ON CONFLICT (key) DO NOTHING, on either dialect.

    Rows go in key order: two routers inserting overlapping batches then take row locks in the same order,
    so PostgreSQL can't deadlock them.
    """
    unique: dict[Any, Mapping[str, Any]] = {}
    for row in rows:
        unique.setdefault(row[key], row)  # the first write of a key wins, inside a batch as across batches
    if not unique:
        return
    ordered = [unique[k] for k in sorted(unique)]
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).on_conflict_do_nothing(index_elements=[key]), ordered)
