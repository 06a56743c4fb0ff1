"""Waiting on a test Prometheus: for an expression's value, for any data, for values to stop changing.

Ray's metrics agent reports every 10 s by default, so a value is only final once it has not changed for
longer than that."""

from __future__ import annotations

import time

from .prometheus_server import Prometheus

SETTLE_S = 12.0
EXPORT_TIMEOUT_S = 120.0
POLL_S = 1.0


def settled(prom: Prometheus, exprs: tuple[str, ...]) -> tuple[float, ...]:
    """The expressions' values once none of them changed for SETTLE_S (0 where there is no data yet).

    A reading where a series that had data has none is a failed scrape (on a busy machine Ray's exporter can
    miss the 1 s scrape timeout, and Prometheus then marks every series stale): it is skipped, not settled on."""
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        values = tuple(prom.value(e) for e in exprs)
        if last is not None and any(v is None and was is not None for v, was in zip(values, last, strict=True)):
            time.sleep(POLL_S)
            continue
        if values != last:
            last, since = values, time.monotonic()
        elif time.monotonic() - since >= SETTLE_S:
            return tuple(v or 0.0 for v in values)
        time.sleep(POLL_S)
    raise AssertionError(f"metrics never settled: {exprs} = {last}")


def wait_for(prom: Prometheus, expr: str, expected: float) -> None:
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while (value := prom.value(expr)) != expected:
        assert time.monotonic() < deadline, f"{expr} = {value}, expected {expected}"
        time.sleep(POLL_S)


def wait_for_any(prom: Prometheus, expr: str, timeout_s: float = EXPORT_TIMEOUT_S) -> list[dict]:
    """The expression's result once it has one."""
    deadline = time.monotonic() + timeout_s
    while not (result := prom.query(expr)["result"]):
        assert time.monotonic() < deadline, f"no data for {expr}"
        time.sleep(POLL_S)
    return result
