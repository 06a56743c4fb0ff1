"""Opening the ledger database: a DSN (or a bare file path) to a SQLAlchemy engine, SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

# A router waits this long for another writer's SQLite lock (WAL: one writer at a time) before erroring.
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def engine_url(dsn: str) -> str:
    """'postgresql://...' -> psycopg 3; a bare path -> a SQLite file; SQLAlchemy URLs pass through."""
    for scheme in POSTGRES_SCHEMES:
        if dsn.startswith(scheme):
            return "postgresql+psycopg://" + dsn.removeprefix(scheme)
    if "://" not in dsn:
        return f"sqlite:///{dsn}"
    return dsn


def _setup_sqlite(engine: sa.Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and can't take the write lock up front; take it
    # ourselves (BEGIN IMMEDIATE) so that two routers on one file serialize instead of failing mid-way.
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # The busy timeout first: switching to WAL takes a lock, and routers opening one file together
        # must wait for it rather than fail with "database is locked".
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
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
