"""Write new latent KV rows into the paged cache by slot_mapping."""

from __future__ import annotations

import torch


def store_latent_kv_ref(
    c_kv: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """c_kv [T, Lkv], k_pe [T, R], kv_cache [num_blocks, block_size, Lkv + R], slot_mapping [T] int64 (in place)."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat[slot_mapping] = torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype)
