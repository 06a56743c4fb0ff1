"""A throwaway Prometheus for tests: Debian's `prometheus` binary on 127.0.0.1, its own config and data dir,
scraping given targets every second and evaluating k2ray's rules; stopped by its PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

INSTALL_HINT = "apt-get install -y prometheus"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.5
SCRAPE_INTERVAL = "1s"


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Prometheus:
    base_url: str

    def query(self, expr: str) -> dict[str, Any]:
        """The instant query API's `data` ({resultType, result}); raises on an error answer."""
        resp = httpx.get(f"{self.base_url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body = resp.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """The range query API's matrix: [{metric: labels, values: [[t, "v"], ...]}, ...]."""
        params = {"query": expr, "start": start, "end": end, "step": step_s}
        body = httpx.get(f"{self.base_url}/api/v1/query_range", params=params, timeout=10.0).json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """A scalar-valued expression's value (None while it has no data)."""
        result = self.query(expr)["result"]
        return float(result[0]["value"][1]) if result else None


@contextmanager
def prometheus_server(binary: str, targets: list[str], rule_groups: list[dict[str, Any]]) -> Iterator[Prometheus]:
    root = Path(tempfile.mkdtemp(prefix="k2ray-prom-"))
    (root / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
    config = {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
              "rule_files": [str(root / "rules.yaml")],
              "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}]}
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc, root / "log")
        yield Prometheus(base)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/-/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"prometheus never became ready: {log.read_text()[-2000:]}")
