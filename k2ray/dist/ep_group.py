"""The process group of one expert-parallel engine replica: N ranks met at a TCPStore rendezvous.

Rank 0 hosts the TCPStore on host:port; the others connect to it. The group is ProcessGroupGloo for
CPU tensors and ProcessGroupNCCL for CUDA ones, with no global world (a process may hold KV pairs too).
Every rendezvous and every gloo collective is bounded by the time-out; NCCL collectives are bounded by
NCCL's own watchdog, built with the same time-out. Any failure tears the group down and raises
EPPeerUnavailable: the ranks of a replica run in lockstep, so one lost rank fails the whole replica,
which is rebuilt from scratch (a fresh group on every rank) rather than repaired.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore

MAX_PORT = 65535


class EPPeerUnavailable(RuntimeError):
    """A rank of the EP group did not join, went away or timed out; the group was torn down."""


@dataclass(frozen=True, slots=True)
class EPGroupSpec:
    """Where one rank meets the others: rank 0 hosts the rendezvous store on host:port. Every rank names
    the same `group_id` and `world_size`; the caller decides the ranks."""

    host: str
    port: int
    group_id: str
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if not 0 < self.port <= MAX_PORT:
            raise ValueError(f"port must be in [1, {MAX_PORT}], got {self.port}")
        if not self.group_id or "/" in self.group_id:
            raise ValueError(f"group_id must be a non-empty name without '/', got {self.group_id!r}")


class EPGroup:
    """One rank's end of an EP group. Not thread-safe: the model's forward thread owns it."""

    def __init__(self, spec: EPGroupSpec, device: torch.device, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.spec = spec
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self._store: TCPStore | None = None
        self._group: dist.ProcessGroup | None = None

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    @property
    def is_connected(self) -> bool:
        return self._group is not None

    def connect(self) -> None:
        """Build the group if there is none; raise EPPeerUnavailable when the others do not join in time."""
        if self._group is not None:
            return
        spec = self.spec
        try:
            is_host = spec.rank == 0
            self._store = TCPStore(spec.host, spec.port, spec.world_size if is_host else None, is_host,
                                   timeout=self.timeout, wait_for_workers=False)
            self._group = self._make_group(PrefixStore(spec.group_id, self._store))
        except (RuntimeError, TimeoutError) as exc:  # TCPStore and the backends raise these (DistError is one)
            self.teardown()
            raise EPPeerUnavailable(f"EP group {spec.group_id!r} at {spec.host}:{spec.port} (rank {spec.rank} of "
                                    f"{spec.world_size}): not all ranks joined within {self.timeout}: {exc}") from exc

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int],
                   input_splits: list[int]) -> None:
        """all_to_all_single over dim 0: input rows [sum(input_splits)] go out in rank order, output rows
        arrive likewise. Every rank must call it, with empty tensors if it has nothing to send."""
        self.connect()
        try:
            work = self._group.alltoall_base(output, input, output_splits, input_splits, dist.AllToAllOptions())
            if self.device.type == "cuda":
                work.wait()  # orders the current stream after the collective; NCCL's watchdog bounds it
            else:
                work.wait(self.timeout)
        except (RuntimeError, TimeoutError) as exc:
            self.teardown()
            raise EPPeerUnavailable(f"EP group {self.spec.group_id!r} (rank {self.spec.rank}): {exc}") from exc

    def teardown(self) -> None:
        """Drop the group and the store (rank 0's store server closes with it). Safe to repeat."""
        self._group = None
        self._store = None

    def _make_group(self, store: PrefixStore) -> dist.ProcessGroup:
        rank, size = self.spec.rank, self.spec.world_size
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            return dist.ProcessGroupNCCL(store, rank, size, options)
        return dist.ProcessGroupGloo(store, rank, size, self.timeout)
