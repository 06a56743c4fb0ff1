"""Decode side of a KV pair: receives latent KV into staging and writes it into reserved blocks.

Transfers are matched by the request key in their header, in whatever order the sender sends
them. A gloo receive cannot be interrupted, so `cancel` never waits for the wire: it marks the
transfer, and under the same lock that guards every write, so once it returns no byte of that
transfer reaches the cache; data still arriving for it is drained and dropped, keeping the pair in
step (the pair keeps a header posted while it is up, so it also drains what comes after the last
receive). A wait that fails (peer gone, time-out, out-of-step header) tears the pair down and fails
every transfer waiting on it; the next `recv` rebuilds the pair.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from k2ray.dist.kv_connector import KVBlockStore, KVTransferConfig, TransferThread, block_chunks
from k2ray.dist.kv_pair_group import KVPeerUnavailable, PairSpec
from k2ray.dist.kv_wire import (
    KVLayoutMismatch,
    KVTransferCancelled,
    KVTransferMeta,
    KVTransferStats,
    TransferHeader,
    TransferStatus,
    block_bytes,
    check_layout,
    decode_header,
    empty_header,
    request_key,
)


@dataclass(eq=False)
class _RecvJob:
    meta: KVTransferMeta
    dst_block_ids: tuple[int, ...]
    future: Future = field(default_factory=Future)
    is_cancelled: bool = False


class KVReceiver(TransferThread):
    """Call `cancel(request_id)` before aborting a request whose receive may be in flight, so its
    blocks can be freed at once; after the future's result, `commit_prefilled` the request."""

    def __init__(self, blocks: KVBlockStore, spec: PairSpec, config: KVTransferConfig) -> None:
        super().__init__(blocks, spec, config, f"k2ray-kv-recv-{spec.pair_id}")
        self._pending: dict[tuple[int, int], _RecvJob] = {}
        self._active: _RecvJob | None = None
        self._cond = threading.Condition(threading.RLock())  # futures' callbacks may call back in
        self._is_closed = False
        self.num_drained = 0  # transfers whose data arrived after they were cancelled (or unasked)
        self.start()

    def recv(self, meta: KVTransferMeta, dst_block_ids: Sequence[int]) -> Future:
        """Expect one transfer into `dst_block_ids` (the reservation's block_ids_to_fill); the
        future gives KVTransferStats, or raises KVPeerUnavailable, KVTransferCancelled,
        KVLayoutMismatch or ValueError."""
        check_layout(self.layout, meta.layout, f"receiving {meta.request_id!r}")
        if len(dst_block_ids) != meta.num_blocks or len(set(dst_block_ids)) != len(dst_block_ids):
            raise ValueError(f"transfer of {meta.request_id!r} needs {meta.num_blocks} distinct block ids, "
                             f"got {list(dst_block_ids)}")
        job = _RecvJob(meta, tuple(dst_block_ids))
        key = request_key(meta.request_id)
        with self._cond:
            if key in self._pending or self._is_active(meta.request_id):
                raise ValueError(f"a receive for {meta.request_id!r} is already waiting")
            self._pending[key] = job
            self._cond.notify()
        return job.future

    def cancel(self, request_id: str) -> bool:
        """Cancel a waiting or in-flight receive; once this returns, nothing more of it is written.
        False when there is none (never asked, or already done)."""
        with self._cond:
            job = self._pending.pop(request_key(request_id), None)
            if job is None and self._is_active(request_id):
                job = self._active
            if job is None or job.is_cancelled:
                return False
            self._finish(job, KVTransferCancelled(f"receive of {request_id!r} cancelled"))
        return True

    @property
    def num_in_flight(self) -> int:
        with self._cond:
            return len(self._pending) + (self._active is not None)

    def close(self) -> None:
        """Stop. A receive already posted cannot be interrupted: with the sender still up (it
        has not closed) this waits for it, at most the time-out."""
        with self._cond:
            self._is_closed = True
            self._cond.notify()
        self.join(self.config.timeout_s)

    def _is_active(self, request_id: str) -> bool:
        return self._active is not None and self._active.meta.request_id == request_id

    def _run(self) -> None:
        while True:
            with self._cond:
                # A connected pair keeps a header posted even with nothing pending, so data for a
                # cancelled receive is drained; idle past the time-out, it is torn down.
                self._cond.wait_for(lambda: self._pending or self.group.is_connected or self._is_closed)
                if self._is_closed:
                    self.group.teardown()
                    return
            try:
                with self.on_stream():
                    self._receive_one()
            except (KVPeerUnavailable, ValueError) as exc:  # out of step or gone: start over on a new pair
                self.group.teardown()
                self._fail_all(exc)

    def _receive_one(self) -> None:
        header_buf = empty_header().to(self.device)
        self.group.recv(header_buf)
        start = time.perf_counter()  # from the header on: the wait for it is idle time, not transfer time
        header = decode_header(header_buf.cpu())
        if header.status == TransferStatus.CLOSED:
            raise KVPeerUnavailable(f"KV pair {self.group.spec.pair_id!r}: the sender closed it")
        with self._cond:
            job = self._active = self._pending.pop(header.request_key, None)
            error = self._check(job, header)
            if error is not None:
                self._finish(job, error)
        try:
            self._receive_chunks(job, header)
        except (KVPeerUnavailable, ValueError) as exc:
            with self._cond:
                self._active = None
                if job is not None and not job.is_cancelled:
                    self._finish(job, KVPeerUnavailable(f"receive of {job.meta.request_id!r} failed: {exc}"))
            raise
        with self._cond:
            self._active = None
            if job is None or job.is_cancelled:
                self.num_drained += header.num_blocks > 0
                return
            num_bytes = header.num_blocks * block_bytes(header.layout)
            job.future.set_result(KVTransferStats(job.meta.request_id, header.num_blocks, num_bytes,
                                                  time.perf_counter() - start))

    @staticmethod
    def _finish(job: _RecvJob, error: Exception) -> None:
        job.is_cancelled = True
        job.future.set_exception(error)

    def _check(self, job: _RecvJob | None, header: TransferHeader) -> Exception | None:
        if job is None or job.is_cancelled:
            return None
        if header.status == TransferStatus.CANCELLED:
            return KVTransferCancelled(f"the sender cancelled the transfer of {job.meta.request_id!r}")
        try:
            check_layout(self.layout, header.layout, f"receiving {job.meta.request_id!r}")
        except KVLayoutMismatch as exc:
            return exc
        if header.num_blocks != job.meta.num_blocks:
            return ValueError(f"transfer of {job.meta.request_id!r}: the sender sends {header.num_blocks} "
                              f"blocks, {job.meta.num_blocks} were asked for")
        return None

    def _receive_chunks(self, job: _RecvJob | None, header: TransferHeader) -> None:
        """Receive the header's chunks (in its own layout, so a drained transfer stays in step),
        writing them into the job's blocks unless it is cancelled by then."""
        if header.num_blocks == 0:
            return
        chunks = block_chunks(range(header.num_blocks), header.chunk_blocks)
        views = [self.staging.chunk(header.layout, header.chunk_blocks, i, len(ids))
                 for i, ids in enumerate(chunks)]
        work = self.group.post_recv(views[0])
        for i, ids in enumerate(chunks):
            self.group.wait(work)
            if i + 1 < len(chunks):  # the next chunk lands in the other buffer while this one is written
                work = self.group.post_recv(views[i + 1])
            with self._cond:
                if job is not None and not job.is_cancelled:
                    self._write(job, [job.dst_block_ids[j] for j in ids], views[i])

    def _write(self, job: _RecvJob, block_ids: list[int], kv) -> None:
        try:
            self.blocks.write_kv_blocks(block_ids, kv)
        except ValueError as exc:  # the caller's block ids: fail this transfer, drain the rest of it
            self._finish(job, exc)

    def _fail_all(self, exc: Exception) -> None:
        with self._cond:
            for job in self._pending.values():
                self._finish(job, KVPeerUnavailable(f"receive of {job.meta.request_id!r} failed: {exc}"))
            self._pending.clear()
