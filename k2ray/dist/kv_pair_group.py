"""A two-rank process group per (prefill core, decode core) pair, built lazily from a TCPStore rendezvous.

Rank 0 hosts the TCPStore on the caller's host:port and opens a fresh rendezvous namespace (a
generation) on every build; rank 1 joins the newest one. The group is ProcessGroupGloo for CPU
tensors and ProcessGroupNCCL for CUDA ones, with no global world. Every wait is bounded by the
time-out; any failure tears the group down, and the next use builds a new one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore

PAIR_WORLD_SIZE = 2
MAX_PORT = 65535
# Point-to-point messages of one pair travel in order on a single tag.
PAIR_TAG = 0
# How often rank 1 looks again for a fresh generation while rank 0 still holds a stale one.
STALE_RETRY_S = 0.05
# How often a CUDA wait looks at its NCCL op.
CUDA_POLL_S = 0.0005


class KVPeerUnavailable(RuntimeError):
    """The peer of a KV pair went away, timed out or holds a stale group; the pair was torn down
    and is rebuilt on its next use."""


@dataclass(frozen=True, slots=True)
class PairSpec:
    """Where one end of a pair meets its peer: rank 0 hosts the rendezvous store on host:port,
    rank 1 connects to it. Both ends name the same `pair_id`; the caller decides the ranks."""

    host: str
    port: int
    pair_id: str
    rank: int

    def __post_init__(self) -> None:
        if self.rank not in (0, 1):
            raise ValueError(f"a KV pair has ranks 0 and 1, got {self.rank}")
        if not 0 < self.port <= MAX_PORT:
            raise ValueError(f"port must be in [1, {MAX_PORT}], got {self.port}")
        if not self.pair_id or "/" in self.pair_id:
            raise ValueError(f"pair_id must be a non-empty name without '/', got {self.pair_id!r}")

    @property
    def peer_rank(self) -> int:
        return 1 - self.rank


class KVPairGroup:
    """One end of a pair's process group. Not thread-safe: one transfer thread owns it."""

    def __init__(self, spec: PairSpec, device: torch.device, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.spec = spec
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self._store: TCPStore | None = None
        self._group: dist.ProcessGroup | None = None
        self._stale_key = ""
        self.num_builds = 0

    @property
    def is_connected(self) -> bool:
        return self._group is not None

    def connect(self) -> None:
        """Build the group if there is none (or rank 1 found ours stale); raise KVPeerUnavailable
        when the peer does not join within the time-out."""
        if self._group is not None and self.spec.rank == 0 and self._guard(self._is_stale):
            self.teardown()
        if self._group is not None:
            return
        try:
            self._build()
        except KVPeerUnavailable:
            self.teardown()
            raise
        except (RuntimeError, TimeoutError) as exc:  # TCPStore and the backends raise these (DistError is one)
            self.teardown()
            raise KVPeerUnavailable(f"KV pair {self.spec.pair_id!r} at {self.spec.host}:{self.spec.port} "
                                    f"(rank {self.spec.rank}): no peer within {self.timeout}: {exc}") from exc

    def post_send(self, tensor: torch.Tensor) -> dist.Work:
        self.connect()
        return self._guard(lambda: self._group.send([tensor], self.spec.peer_rank, PAIR_TAG))

    def post_recv(self, tensor: torch.Tensor) -> dist.Work:
        self.connect()
        return self._guard(lambda: self._group.recv([tensor], self.spec.peer_rank, PAIR_TAG))

    def wait(self, work: dist.Work) -> None:
        """Wait for a posted send or recv, bounded by the time-out. On CUDA until the op is done
        on the device (NCCL's wait only orders streams, and a stream sync could wait forever)."""
        if self.device.type == "cuda":
            self._guard(lambda: self._poll(work))
        else:
            self._guard(lambda: work.wait(self.timeout))

    def _poll(self, work: dist.Work) -> None:
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not work.is_completed():
            if time.monotonic() > deadline:
                self._group.abort()
                raise TimeoutError(f"NCCL send/recv not done within {self.timeout}")
            time.sleep(CUDA_POLL_S)

    def send(self, tensor: torch.Tensor) -> None:
        self.wait(self.post_send(tensor))

    def recv(self, tensor: torch.Tensor) -> None:
        self.wait(self.post_recv(tensor))

    def teardown(self) -> None:
        """Drop the group and the store (rank 0's store server closes with it). Safe to repeat."""
        self._group = None
        self._store = None

    def _guard(self, op):
        try:
            return op()
        except (RuntimeError, TimeoutError) as exc:
            self.teardown()
            raise KVPeerUnavailable(f"KV pair {self.spec.pair_id!r} (rank {self.spec.rank}): {exc}") from exc

    def _is_stale(self) -> bool:
        return self._store.check([self._stale_key])

    def _build(self) -> None:
        store, namespace = self._host_generation() if self.spec.rank == 0 else self._join_generation()
        self._store = store
        self._stale_key = f"{namespace}/stale"
        self._group = self._make_group(PrefixStore(namespace, store))
        self.num_builds += 1

    def _open_store(self) -> TCPStore:
        is_host = self.spec.rank == 0
        return TCPStore(self.spec.host, self.spec.port, PAIR_WORLD_SIZE if is_host else None, is_host,
                        timeout=self.timeout, wait_for_workers=False)

    def _host_generation(self) -> tuple[TCPStore, str]:
        store = self._open_store()
        generation = uuid.uuid4().hex
        store.set(f"{self.spec.pair_id}/generation", generation)
        return store, f"{self.spec.pair_id}/{generation}"

    def _join_generation(self) -> tuple[TCPStore, str]:
        """Rank 1 joins the newest generation. A second join of one generation means rank 0 still
        holds the group of the first: flag it (rank 0 rebuilds on its next use) and try again
        until the time-out, rather than meet a peer that is not listening."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while True:
            store = self._open_store()
            namespace = f"{self.spec.pair_id}/{store.get(f'{self.spec.pair_id}/generation').decode()}"
            if store.add(f"{namespace}/joins", 1) == 1:
                return store, namespace
            store.set(f"{namespace}/stale", "1")
            if time.monotonic() >= deadline:
                raise KVPeerUnavailable(f"KV pair {self.spec.pair_id!r}: the peer still holds an older group "
                                        f"after {self.timeout}; it rebuilds on its next use")
            time.sleep(STALE_RETRY_S)

    def _make_group(self, store: PrefixStore) -> dist.ProcessGroup:
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            return dist.ProcessGroupNCCL(store, self.spec.rank, PAIR_WORLD_SIZE, options)
        return dist.ProcessGroupGloo(store, self.spec.rank, PAIR_WORLD_SIZE, self.timeout)
