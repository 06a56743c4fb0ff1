"""What a KV transfer says about itself: the control metadata the caller carries between the two
ends (its own control path), and the fixed-size header that opens each transfer on the wire.

On a pair, the sender writes per transfer: one header (int64[HEADER_LEN]), then the latent KV of
`num_blocks` blocks in chunks of at most `chunk_blocks` blocks, each chunk a contiguous
[num_layers, n, block_size, kv_cache_dim] tensor in the cache dtype. The header names the request
(a 128-bit digest of its id), so the receiver matches transfers in whatever order they arrive and
drains the ones it no longer wants.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

import torch

from k2ray.engine.kv.kv_transfer import KVReservation, LatentKVLayout, PrefillResult

HEADER_MAGIC = 0x4B32_4B56  # "K2KV"
HEADER_VERSION = 1
HEADER_LEN = 11
REQUEST_KEY_BYTES = 16
CLOSED_KEY = (0, 0)  # the request key of a CLOSED header, which names no request
# Cache dtypes a layout may carry, by their wire code.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class KVLayoutMismatch(ValueError):
    """The two ends of a transfer disagree on the latent KV layout (layers, block size, width, dtype)."""


class KVTransferCancelled(RuntimeError):
    """The transfer was cancelled (a decode-side abort, or the sender gave it up)."""


class TransferStatus(IntEnum):
    DATA = 0
    CANCELLED = 1
    CLOSED = 2  # the sender is going away: the receiver tears the pair down now, not at its time-out


STATUS_VALUES = frozenset(status.value for status in TransferStatus)


@dataclass(frozen=True, slots=True)
class KVTransferMeta:
    """One request's transfer, as the decode side describes it to the prefill side: of the
    prompt's `num_computed_blocks + num_blocks` blocks, the first `num_computed_blocks` are in
    the decode side's prefix cache and only the last `num_blocks` travel, in `layout`."""

    request_id: str
    num_computed_blocks: int
    num_blocks: int
    layout: LatentKVLayout

    @classmethod
    def from_reservation(cls, reservation: KVReservation, layout: LatentKVLayout) -> KVTransferMeta:
        return cls(reservation.request_id, reservation.num_computed_blocks,
                   len(reservation.block_ids_to_fill), layout)

    def src_block_ids(self, prefill: PrefillResult) -> tuple[int, ...]:
        """The prefill engine's blocks to send: those the decode side lacks."""
        if prefill.request_id != self.request_id:
            raise ValueError(f"prefill result for {prefill.request_id!r} does not match the transfer of "
                             f"{self.request_id!r}")
        if len(prefill.block_ids) != self.num_computed_blocks + self.num_blocks:
            raise ValueError(f"prefill holds {len(prefill.block_ids)} blocks, decode expects "
                             f"{self.num_computed_blocks} cached + {self.num_blocks} sent: the engines "
                             "disagree on block_size or the prompt")
        return prefill.block_ids[self.num_computed_blocks:]


@dataclass(frozen=True, slots=True)
class KVTransferStats:
    """What one end moved for one request: blocks, bytes and the seconds from start to done."""

    request_id: str
    num_blocks: int
    num_bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class TransferHeader:
    request_key: tuple[int, int]
    status: TransferStatus
    num_blocks: int
    chunk_blocks: int
    layout: LatentKVLayout


def request_key(request_id: str) -> tuple[int, int]:
    digest = hashlib.blake2b(request_id.encode(), digest_size=REQUEST_KEY_BYTES).digest()
    half = REQUEST_KEY_BYTES // 2
    return (int.from_bytes(digest[:half], "little", signed=True),
            int.from_bytes(digest[half:], "little", signed=True))


def check_layout(expected: LatentKVLayout, got: LatentKVLayout, where: str) -> None:
    if expected != got:
        raise KVLayoutMismatch(f"latent KV layout mismatch ({where}): this end has {expected}, the other "
                               f"end has {got}")


def block_bytes(layout: LatentKVLayout) -> int:
    return layout.num_layers * layout.block_size * layout.kv_cache_dim * layout.dtype.itemsize


def encode_header(header: TransferHeader) -> torch.Tensor:
    layout = header.layout
    if layout.dtype not in DTYPE_CODES:
        raise KVLayoutMismatch(f"no wire code for cache dtype {layout.dtype}")
    return torch.tensor([HEADER_MAGIC, HEADER_VERSION, *header.request_key, int(header.status),
                         header.num_blocks, header.chunk_blocks, layout.num_layers, layout.block_size,
                         layout.kv_cache_dim, DTYPE_CODES[layout.dtype]], dtype=torch.int64)


def decode_header(values: torch.Tensor) -> TransferHeader:
    """Parse a received header; ValueError when it is not one (the pair is out of step)."""
    (magic, version, key_hi, key_lo, status, num_blocks, chunk_blocks, num_layers, block_size,
     kv_cache_dim, dtype_code) = values.tolist()
    if magic != HEADER_MAGIC or version != HEADER_VERSION:
        raise ValueError(f"not a KV transfer header (magic {magic:#x}, version {version})")
    if status not in STATUS_VALUES or dtype_code not in CODE_DTYPES or num_blocks < 0 or chunk_blocks < 1:
        raise ValueError(f"malformed KV transfer header {values.tolist()}")
    layout = LatentKVLayout(num_layers, block_size, kv_cache_dim, CODE_DTYPES[dtype_code])
    return TransferHeader((key_hi, key_lo), TransferStatus(status), num_blocks, chunk_blocks, layout)


def empty_header() -> torch.Tensor:
    return torch.empty(HEADER_LEN, dtype=torch.int64)
