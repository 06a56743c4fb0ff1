"""Batching usage records off the request path: a thread drains a queue into the ledger.

`submit` never blocks on the database. The thread writes a batch when it holds `max_batch_records`
records or `flush_interval_s` after the batch's first record, whichever comes first. A batch that fails
to write is kept and retried (writes are idempotent, so a retry after a lost commit acknowledgement
duplicates nothing); `close` writes everything still queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from .ledger import Ledger
from .meter import MS_PER_S, UsageRecord, now_ms

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriterConfig:
    max_batch_records: int = 256
    flush_interval_s: float = 1.0
    retry_interval_s: float = 1.0
    num_close_attempts: int = 5

    def __post_init__(self) -> None:
        if self.max_batch_records < 1 or self.flush_interval_s <= 0 or self.retry_interval_s <= 0:
            raise ValueError(f"invalid writer config: {self}")
        if self.num_close_attempts < 1:
            raise ValueError("num_close_attempts must be at least 1")


class LedgerWriteError(RuntimeError):
    pass


class WriterObserver(Protocol):
    """Told of every batch write attempt, on the writer's thread (the router turns this into metrics).
    `lag_s`: how long ago the batch's oldest record finished."""

    def batch_written(self, num_records: int, lag_s: float) -> None: ...
    def batch_failed(self, num_records: int, lag_s: float) -> None: ...


class _Flush:
    """A marker in the queue: set once every record queued before it is written."""

    def __init__(self) -> None:
        self.done = threading.Event()


_CLOSE = object()


class LedgerWriter:
    def __init__(self, ledger: Ledger, config: WriterConfig | None = None,
                 observer: WriterObserver | None = None) -> None:
        self.ledger = ledger
        self.config = config or WriterConfig()
        self._observer = observer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[UsageRecord] = []
        self._num_written = 0
        self._is_closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="k2ray-ledger-writer", daemon=True)
        self._thread.start()

    @property
    def num_written(self) -> int:
        return self._num_written

    def submit(self, record: UsageRecord) -> None:
        if self._is_closed:
            raise RuntimeError("the ledger writer is closed")
        self._queue.put(record)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every record submitted so far is written; False if that took longer than timeout_s."""
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout_s)

    def close(self) -> None:
        """Write everything submitted, stop the thread. Raises LedgerWriteError if records stay unwritten."""
        with self._close_lock:
            if self._is_closed:
                return
            self._is_closed = True
        self._queue.put(_CLOSE)
        self._thread.join()
        if self._pending:
            raise LedgerWriteError(f"{len(self._pending)} usage records could not be written to the ledger")

    def _write_pending(self) -> bool:
        try:
            self.ledger.write(self._pending)
        except Exception:
            logger.exception("writing %d usage records failed; will retry", len(self._pending))
            self._notify(is_written=False)
            return False
        self._notify(is_written=True)
        self._num_written += len(self._pending)
        self._pending = []
        return True

    def _notify(self, is_written: bool) -> None:
        if self._observer is None:
            return
        lag_s = (now_ms() - min(r.finished_at_ms for r in self._pending)) / MS_PER_S
        try:
            notify = self._observer.batch_written if is_written else self._observer.batch_failed
            notify(len(self._pending), lag_s)
        except Exception:  # an observer must never stop the records from being written
            logger.exception("the ledger writer's observer failed")

    def _run(self) -> None:
        deadline: float | None = None  # when the oldest pending record is due (or the next retry)
        is_retrying = False
        markers: list[_Flush] = []
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _CLOSE:
                self._drain_on_close(markers)
                return
            if isinstance(item, _Flush):
                markers.append(item)
            elif item is not None:
                self._pending.append(item)
                deadline = deadline or time.monotonic() + self.config.flush_interval_s
            is_full = len(self._pending) >= self.config.max_batch_records and not is_retrying
            if item is not None and not isinstance(item, _Flush) and not is_full:
                continue
            if self._pending and not self._write_pending():
                is_retrying, deadline = True, time.monotonic() + self.config.retry_interval_s
                continue
            is_retrying, deadline = False, None
            for marker in markers:
                marker.done.set()
            markers = []

    def _drain_on_close(self, markers: list[_Flush]) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Flush):
                markers.append(item)
            elif item is not _CLOSE:
                self._pending.append(item)
        for attempt in range(self.config.num_close_attempts):
            if not self._pending or self._write_pending():
                break
            if attempt + 1 < self.config.num_close_attempts:
                time.sleep(self.config.retry_interval_s)
        for marker in markers:
            marker.done.set()
