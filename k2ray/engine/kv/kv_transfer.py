"""Contracts between a prefill engine and a decode engine (role="prefill" / role="decode").

Everything here crosses a process boundary in disaggregated serving, so it is plain, frozen and
picklable; the bulk latent KV travels separately as the tensor of `ModelRunner.read_kv_blocks`.

    prefill engine                         decode engine
    add_request ─► step … ─► PrefillResult ─┐
                                            ├─► plan_kv_transfer ─► KVTransferParams
    add_prefilled_request ─► KVReservation ─┘
    read_kv_blocks(src_block_ids) ─── latent KV ───► write_kv_blocks(dst_block_ids)
    release_prefilled                                commit_prefilled ─► continuous-batching decode
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2ray.engine.outputs import SampledLogprobs


@dataclass(frozen=True, slots=True)
class LatentKVLayout:
    """Shape of one engine's latent KV blocks; both ends of a transfer must agree on it."""

    num_layers: int
    block_size: int
    kv_cache_dim: int
    dtype: torch.dtype

    def shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        """Shape of the tensor that carries `num_blocks` blocks: [num_layers, n, block_size, kv_cache_dim]."""
        return self.num_layers, num_blocks, self.block_size, self.kv_cache_dim


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """A prefill engine's result for one request: the first sampled token and where the prompt's
    latent KV sits. `block_ids` stay held on the prefill engine until `release_prefilled` (or an
    abort). `num_cached_tokens` is what its prefix cache really served; `num_tokens` is the number
    of prompt tokens whose KV the blocks hold."""

    request_id: str
    first_token_id: int
    first_logprobs: SampledLogprobs | None
    num_cached_tokens: int
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class KVReservation:
    """A decode engine's blocks for a prompt whose KV comes from a prefill engine. The first
    `num_computed_blocks` were served by the decode engine's own prefix cache and must not be
    written; the rest wait for the transfer."""

    request_id: str
    block_ids: tuple[int, ...]
    num_computed_blocks: int

    @property
    def block_ids_to_fill(self) -> tuple[int, ...]:
        return self.block_ids[self.num_computed_blocks:]


@dataclass(frozen=True, slots=True)
class KVTransferParams:
    """One request's block copy: latent KV of prefill block src_block_ids[i] goes into decode
    block dst_block_ids[i]."""

    request_id: str
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.dst_block_ids)


def plan_kv_transfer(prefill: PrefillResult, reservation: KVReservation) -> KVTransferParams:
    """Pair the prefill engine's blocks with the decode engine's blocks that still need data."""
    if prefill.request_id != reservation.request_id:
        raise ValueError(f"prefill result for {prefill.request_id!r} does not match the reservation for "
                         f"{reservation.request_id!r}")
    if len(prefill.block_ids) != len(reservation.block_ids):
        raise ValueError(f"prefill holds {len(prefill.block_ids)} blocks, decode reserved "
                         f"{len(reservation.block_ids)}: the engines disagree on block_size or the prompt")
    start = reservation.num_computed_blocks
    return KVTransferParams(prefill.request_id, prefill.block_ids[start:], reservation.block_ids[start:])
