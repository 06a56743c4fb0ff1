"""Test-side handle on a prefill engine process (kv_prefill_worker.serve), with bounded waits."""

from __future__ import annotations

import multiprocessing as mp

from kv_prefill_worker import WorkerArgs, serve

# Spawning imports torch and loads k2-tiny: seconds on a loaded two-core machine.
STARTUP_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0


class PrefillProcess:
    def __init__(self, args: WorkerArgs) -> None:
        ctx = mp.get_context("spawn")
        self.args = args
        self.conn, child = ctx.Pipe()
        self.release = ctx.Event()  # opens a paused gate
        self.process = ctx.Process(target=serve, args=(args, child, self.release), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(STARTUP_TIMEOUT_S) or self.conn.recv() != "ready":
            self.kill()
            raise TimeoutError("the prefill process did not start")

    def call(self, *command):
        self.conn.send(command)
        if not self.conn.poll(CALL_TIMEOUT_S):
            raise TimeoutError(f"the prefill process did not answer {command[0]!r}")
        return self.conn.recv()

    def set_gate(self, mode: str, after_reads: int = 1) -> None:
        self.release.clear()
        self.call("gate", mode, after_reads)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("exit")
            except (OSError, EOFError, TimeoutError):
                pass
        self.process.join(CALL_TIMEOUT_S)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(CALL_TIMEOUT_S)
