"""Versioned migrations: a table of applied versions, pending steps applied in order under one lock.

Several routers may start at once on one database: the whole check-and-apply runs in one transaction
holding a database-wide lock (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL).
A new schema version appends a step here and updates schema.py; a step never changes once released.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from . import schema
from .meter import now_ms

# pg_advisory_xact_lock key: any fixed bigint, shared by every k2ray router on the database.
MIGRATION_LOCK_KEY = 0x6B32726179  # "k2ray"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _create_version_1(conn: sa.Connection) -> None:
    for table in schema.VERSION_1_TABLES:
        table.create(conn)


MIGRATIONS = (
    Migration(1, "usage records and API keys", _create_version_1),
)
LATEST_VERSION = MIGRATIONS[-1].version


def applied_versions(conn: sa.Connection) -> list[int]:
    rows = conn.execute(sa.select(schema.schema_versions.c.version).order_by(schema.schema_versions.c.version))
    return [row.version for row in rows]


def migrate(engine: sa.Engine) -> list[int]:
    """Apply every pending migration; returns the versions this call applied (empty if up to date)."""
    applied_now = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        schema.schema_versions.create(conn, checkfirst=True)
        done = set(applied_versions(conn))
        if done and max(done) > LATEST_VERSION:
            raise RuntimeError(f"the ledger is at schema version {max(done)}, newer than this k2ray "
                               f"({LATEST_VERSION}): upgrade k2ray")
        for step in MIGRATIONS:
            if step.version in done:
                continue
            step.apply(conn)
            conn.execute(sa.insert(schema.schema_versions).values(
                version=step.version, description=step.description, applied_at_ms=now_ms()))
            applied_now.append(step.version)
    return applied_now
