"""Paged MLA decode attention in the absorbed form over the latent cache.

Per token the cache row holds [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]. With W_UK absorbed into
the query, scores are q_latent . c_kv + q_pe . k_pe, and the output stays in latent space (the
caller applies W_UV):
    q_latent [B, H, Lkv], q_pe [B, H, R], kv_cache [num_blocks, block_size, Lkv + R]
    block_tables [B, max_num_blocks] int32, seq_lens [B] -> out [B, H, Lkv]
"""

from __future__ import annotations

import torch


def mla_decode_attention_ref(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    batch, _, kv_lora_rank = q_latent.shape
    block_size = kv_cache.shape[1]
    max_num_blocks = block_tables.shape[1]
    # [B, max_num_blocks * block_size, Lkv + R]
    kv = kv_cache[block_tables.long()].view(batch, max_num_blocks * block_size, -1).to(torch.float32)
    c_kv, k_pe = kv[..., :kv_lora_rank], kv[..., kv_lora_rank:]
    scores = torch.einsum("bhc,btc->bht", q_latent.to(torch.float32), c_kv)
    scores = scores + torch.einsum("bhr,btr->bht", q_pe.to(torch.float32), k_pe)
    positions = torch.arange(kv.shape[1], device=kv.device)
    is_padding = positions.unsqueeze(0) >= seq_lens.to(kv.device).unsqueeze(1)  # [B, T]
    scores = scores.masked_fill(is_padding.unsqueeze(1), float("-inf")) * softmax_scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bht,btc->bhc", probs, c_kv).to(q_latent.dtype)
