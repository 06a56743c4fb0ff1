"""Prefill side of a KV pair: pushes the latent KV of exactly the blocks the decode side lacks."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from k2ray.dist.kv_connector import KVBlockStore, KVTransferConfig, TransferThread, block_chunks
from k2ray.dist.kv_pair_group import KVPeerUnavailable, PairSpec
from k2ray.dist.kv_wire import (
    CLOSED_KEY,
    KVTransferCancelled,
    KVTransferMeta,
    KVTransferStats,
    TransferHeader,
    TransferStatus,
    block_bytes,
    check_layout,
    encode_header,
    request_key,
)


@dataclass(eq=False)
class _SendJob:
    meta: KVTransferMeta
    src_block_ids: tuple[int, ...]
    ready: torch.cuda.Event | None
    future: Future = field(default_factory=Future)
    is_cancelled: bool = False


class KVSender(TransferThread):
    """Sends transfers in the order `send` is called, on its own thread. The prefill engine must
    hold the source blocks until the returned future is done (then `release_prefilled`)."""

    def __init__(self, blocks: KVBlockStore, spec: PairSpec, config: KVTransferConfig) -> None:
        super().__init__(blocks, spec, config, f"k2ray-kv-send-{spec.pair_id}")
        self._jobs: queue.SimpleQueue[_SendJob | None] = queue.SimpleQueue()
        self._queued: dict[str, _SendJob] = {}
        self._lock = threading.Lock()
        self._active_request_id: str | None = None
        self.start()

    def send(self, meta: KVTransferMeta, src_block_ids: Sequence[int]) -> Future:
        """Queue one transfer; the future gives KVTransferStats, or raises KVPeerUnavailable (peer
        gone or timed out), KVTransferCancelled, or ValueError."""
        check_layout(self.layout, meta.layout, f"sending {meta.request_id!r}")
        if len(src_block_ids) != meta.num_blocks:
            raise ValueError(f"transfer of {meta.request_id!r} carries {meta.num_blocks} blocks, got "
                             f"{len(src_block_ids)} block ids")
        job = _SendJob(meta, tuple(src_block_ids), self.record_ready())
        with self._lock:
            if meta.request_id in self._queued:
                raise ValueError(f"a transfer of {meta.request_id!r} is already queued")
            self._queued[meta.request_id] = job
        self._jobs.put(job)
        return job.future

    def cancel(self, meta: KVTransferMeta) -> bool:
        """Give up a transfer that has not started: the receiver gets a cancel notice instead of
        the data (also when nothing was queued, so a waiting receiver is released). False when the
        data is already on its way."""
        with self._lock:
            job = self._queued.get(meta.request_id)
            if job is not None:
                job.is_cancelled = True
                return True
            if self._active_request_id == meta.request_id:
                return False
        self._jobs.put(_SendJob(meta, (), None, is_cancelled=True))
        return True

    def close(self) -> None:
        """Finish the queued transfers, tell the receiver, and stop."""
        self._jobs.put(None)
        self.join(self.config.timeout_s)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run_job(job)
        if self.group.is_connected:
            closed = TransferHeader(CLOSED_KEY, TransferStatus.CLOSED, 0, 1, self.layout)
            try:
                self.group.send(encode_header(closed).to(self.device))
            except KVPeerUnavailable:
                pass  # the receiver is gone already
        self.group.teardown()

    def _run_job(self, job: _SendJob) -> None:
        with self._lock:
            if self._queued.get(job.meta.request_id) is job:
                del self._queued[job.meta.request_id]
            is_cancelled = job.is_cancelled
            self._active_request_id = job.meta.request_id
        try:
            with self.on_stream():
                stats = self._transfer(job, is_cancelled)
        except Exception as exc:  # the caller's future carries every failure
            job.future.set_exception(exc)
            return
        finally:
            with self._lock:
                self._active_request_id = None
        if is_cancelled:
            job.future.set_exception(KVTransferCancelled(f"transfer of {job.meta.request_id!r} cancelled"))
        else:
            job.future.set_result(stats)

    def _transfer(self, job: _SendJob, is_cancelled: bool) -> KVTransferStats:
        start = time.perf_counter()
        meta = job.meta
        status = TransferStatus.CANCELLED if is_cancelled else TransferStatus.DATA
        num_blocks = 0 if is_cancelled else meta.num_blocks
        chunk_blocks = self.config.chunk_blocks(self.layout)
        header = TransferHeader(request_key(meta.request_id), status, num_blocks, chunk_blocks, self.layout)
        self._send_header(encode_header(header).to(self.device))
        if num_blocks:
            self.wait_ready(job.ready)
            try:
                self._send_chunks(block_chunks(job.src_block_ids, chunk_blocks), chunk_blocks)
            except Exception:
                self.group.teardown()  # the header is out, the data is not: the receiver must not wait for it
                raise
        return KVTransferStats(meta.request_id, num_blocks, num_blocks * block_bytes(self.layout),
                               time.perf_counter() - start)

    def _send_header(self, header: torch.Tensor) -> None:
        was_connected = self.group.is_connected
        try:
            self.group.send(header)
        except KVPeerUnavailable:
            if not was_connected:
                raise
            # The pair died since its last use (the peer left or timed out): nothing of this
            # transfer reached it, so one attempt on a fresh pair.
            self.group.send(header)

    def _send_chunks(self, chunks: list[tuple[int, ...]], chunk_blocks: int) -> None:
        # Copy chunk i+1 out of the cache while chunk i is on the wire.
        def read(index: int) -> torch.Tensor:
            out = self.staging.chunk(self.layout, chunk_blocks, index, len(chunks[index]))
            return self.blocks.read_kv_blocks(chunks[index], out=out)

        work = self.group.post_send(read(0))
        for index in range(1, len(chunks)):
            kv = read(index)
            self.group.wait(work)
            work = self.group.post_send(kv)
        self.group.wait(work)
