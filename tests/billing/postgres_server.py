"""A throwaway PostgreSQL server for tests: initdb in a temp dir, listening on 127.0.0.1 on a free port.

Uses Debian's `postgresql` binaries (`apt-get install -y postgresql`); as root the cluster runs as the
unprivileged `postgres` user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "apt-get install -y postgresql"
START_TIMEOUT_S = 60
UNPRIVILEGED_USER = "postgres"


def find_bin_dir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runner() -> tuple[list[str], int | None]:
    """The command prefix that runs as a non-root user, and that user's uid to chown the data dir to."""
    if os.geteuid() != 0:
        return [], None
    try:
        uid = pwd.getpwnam(UNPRIVILEGED_USER).pw_uid
    except KeyError as e:
        raise RuntimeError(f"running as root needs a {UNPRIVILEGED_USER!r} user to run PostgreSQL") from e
    return ["runuser", "-u", UNPRIVILEGED_USER, "--"], uid


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Yield a DSN for the `postgres` database of a fresh server; stop it and remove its files after."""
    prefix, uid = _runner()
    root = Path(tempfile.mkdtemp(prefix="k2ray-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if uid is not None:
        os.chown(root, uid, -1)
        os.chown(sockets, uid, -1)
    port = _free_port()
    pg_ctl = [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=START_TIMEOUT_S)
        options = f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=100"
        subprocess.run([*pg_ctl, "-w", "-t", str(START_TIMEOUT_S), "-o", options, "-l", str(root / "log"),
                        "start"], check=True, capture_output=True, timeout=START_TIMEOUT_S + 10)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, timeout=START_TIMEOUT_S)
        shutil.rmtree(root, ignore_errors=True)
