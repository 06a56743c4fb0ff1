from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from .postgres_server import INSTALL_HINT, find_bin_dir, postgres_server

_database_ids = itertools.count()


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")
    with postgres_server(bin_dir) as dsn:
        yield dsn


def _fresh_postgres_database(server_dsn: str) -> str:
    name = f"k2ray_test_{next(_database_ids)}"
    engine = sa.create_engine(server_dsn.replace("postgresql://", "postgresql+psycopg://"),
                              isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server_dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return _fresh_postgres_database(request.getfixturevalue("postgres_dsn"))
