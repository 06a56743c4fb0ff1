"""`k2ray serve` as a user sees it: one ready line with the real URL, a request served, and Ctrl-C ending it
quietly with exit code 0 and no process of its Ray node left behind. The server is the session's (shared with
the README's snippets); this test runs after them and stops it."""

from __future__ import annotations

import time

import httpx
import pytest

pytest.importorskip("ray")

GONE_TIMEOUT_S = 1.0  # k2ray serve waits for its processes before it exits; this covers reaping only
GONE_POLL_S = 0.1
ALARMING = ("Traceback", "failed")


@pytest.mark.slow
@pytest.mark.stops_k2ray_serve
def test_serve_prints_one_ready_line_and_ctrl_c_ends_everything(k2ray_serve_process):
    server = k2ray_serve_process
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120.0, json={
        "model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1
    server.record_descendants()
    names = {p.name() for p in server.alive_descendants()}
    assert any("raylet" in n for n in names) and any("ServeReplica" in n for n in names), names
    returncode = server.interrupt()
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while server.alive_descendants() and time.monotonic() < deadline:
        time.sleep(GONE_POLL_S)
    left = {p.pid: p.name() for p in server.alive_descendants()}
    output = server.output
    url_lines = [line for line in output.splitlines() if "http://" in line]
    problems = {
        "exit code": returncode != 0,
        "alarming output": [w for w in ALARMING if w in output],
        "not exactly one line with a URL": len(url_lines) != 1,
        "the ready line lacks the real URL": not any(f" at http://127.0.0.1:{server.port}/v1 " in u for u in url_lines),
        "processes left after exit": left,
    }
    failed = {k: v for k, v in problems.items() if v}
    assert not failed, f"{failed}\n{output}"
