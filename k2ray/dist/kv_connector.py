"""What both ends of a KV transfer share: the config, the block store they read or write (a
ModelRunner, or anything with its three members), and the transfer thread with its CUDA stream."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from k2ray.dist.kv_pair_group import KVPairGroup, PairSpec
from k2ray.dist.kv_wire import block_bytes
from k2ray.engine.kv.kv_transfer import LatentKVLayout

DEFAULT_KV_TRANSFER_TIMEOUT_S = 30.0
# Bounds the staging memory of a transfer (two chunks per end) and lets the copy out of (or into)
# the cache overlap the wire.
DEFAULT_MAX_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class KVTransferConfig:
    """`timeout_s` bounds every wait of a transfer (rendezvous, header, each chunk);
    `max_chunk_bytes` caps one chunk of latent KV on the wire (at least one block travels)."""

    timeout_s: float = DEFAULT_KV_TRANSFER_TIMEOUT_S
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be at least 1, got {self.max_chunk_bytes}")

    def chunk_blocks(self, layout: LatentKVLayout) -> int:
        return max(1, self.max_chunk_bytes // block_bytes(layout))


class KVBlockStore(Protocol):
    """The paged latent KV cache of one engine, as ModelRunner exposes it."""

    device: torch.device

    @property
    def kv_layout(self) -> LatentKVLayout: ...

    def read_kv_blocks(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor: ...

    def write_kv_blocks(self, block_ids: Sequence[int], kv: torch.Tensor) -> None: ...


def block_chunks(block_ids: Sequence[int], chunk_blocks: int) -> list[tuple[int, ...]]:
    return [tuple(block_ids[i:i + chunk_blocks]) for i in range(0, len(block_ids), chunk_blocks)]


class StagingBuffers:
    """Two chunk-sized buffers per end, kept across transfers (fresh ones would page-fault every
    chunk in): chunk i uses buffer i % 2 while the other one is on the wire."""

    NUM_BUFFERS = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._key: tuple[LatentKVLayout, int] | None = None
        self._buffers: list[torch.Tensor] = []

    def chunk(self, layout: LatentKVLayout, chunk_blocks: int, index: int, num_blocks: int) -> torch.Tensor:
        """A contiguous [num_layers, num_blocks, block_size, kv_cache_dim] view of buffer index % 2."""
        if self._key != (layout, chunk_blocks):
            self._buffers = []  # the old ones go before the new ones come
            numel = chunk_blocks * block_bytes(layout) // layout.dtype.itemsize
            self._buffers = [torch.empty(numel, dtype=layout.dtype, device=self.device)
                             for _ in range(self.NUM_BUFFERS)]
            self._key = (layout, chunk_blocks)
        shape = layout.shape(num_blocks)
        return self._buffers[index % self.NUM_BUFFERS][:math.prod(shape)].view(shape)


class TransferThread:
    """One end's transfer thread: owns the pair group (only this thread touches it) and, on CUDA,
    a stream of its own so copies and sends never queue behind the engine's step."""

    def __init__(self, blocks: KVBlockStore, spec: PairSpec, config: KVTransferConfig, name: str) -> None:
        self.blocks = blocks
        self.layout = blocks.kv_layout
        self.config = config
        self.device = device = blocks.device
        self.group = KVPairGroup(spec, device, config.timeout_s)
        self.staging = StagingBuffers(device)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        with torch.cuda.stream(self._stream):
            yield

    def record_ready(self) -> torch.cuda.Event | None:
        """On CUDA, an event on the caller's stream: the transfer stream waits for it before reading."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait_ready(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self._stream.wait_event(event)

    def _run(self) -> None:
        raise NotImplementedError
