"""`k2ray serve` run as a user runs it: a subprocess on a free loopback port, small enough for a 2-core box,
stopped with SIGINT to its process group (what Ctrl-C in a terminal sends)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

READY_TIMEOUT_S = 600.0  # Ray, two replicas and the engine core on two shared cores
STOP_TIMEOUT_S = 120.0
LINE_POLL_S = 0.2
READY_LINE = re.compile(r"^k2ray: serving (.+) at (http://\S+)/v1 ")
SMALL_CONFIG = {  # the default model ids (Standard and Turbo), as `make serve` serves them
    "direct_ingress": True,  # as `make serve` (deploy/serve/local.yaml)
    "ray_num_cpus": 4,  # logical: replicas ask for fractions, the machine has 2 cores
    "engine": {"num_cpus": 0.5, "torch_threads": 1, "max_num_seqs": 8, "max_num_batched_tokens": 512,
               "max_model_len": 1024, "num_kv_blocks": 256},
    "router": {"num_cpus": 0.25},
}


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    lines: list[str] = field(default_factory=list)
    descendants: set[psutil.Process] = field(default_factory=set)
    base_url: str = ""

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def record_descendants(self) -> None:
        self.descendants |= set(psutil.Process(self.proc.pid).children(recursive=True))

    def alive_descendants(self) -> set[psutil.Process]:
        alive = set()
        for p in self.descendants:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.add(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the whole process group; the exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _k2ray_command() -> list[str]:
    script = Path(sys.executable).with_name("k2ray")
    return [str(script)] if script.exists() else [shutil.which("k2ray") or "k2ray"]


@contextmanager
def k2ray_serve(tmp_path: Path, port: int | None = None) -> Iterator[ServeProcess]:
    """Start `k2ray serve`, wait for its ready line, yield; kill whatever is left of it on the way out."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(SMALL_CONFIG))
    port = port or free_port()
    proc = subprocess.Popen([*_k2ray_command(), "serve", "--config", str(config), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    server = ServeProcess(proc, port)
    reader = threading.Thread(target=_read_lines, args=(proc, server.lines), daemon=True)
    reader.start()
    try:
        server.base_url = _wait_ready(server)
        server.record_descendants()
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in server.alive_descendants():  # only after a failure: the test reports them
            p.kill()
        reader.join(timeout=STOP_TIMEOUT_S)


def _read_lines(proc: subprocess.Popen, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)


def _wait_ready(server: ServeProcess) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in server.lines:
            if match := READY_LINE.match(line):
                return match.group(2)
        if server.proc.poll() is not None:
            break
        time.sleep(LINE_POLL_S)
    raise AssertionError(f"k2ray serve never printed its ready line:\n{server.output[-4000:]}")
