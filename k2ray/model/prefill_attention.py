"""MLA prefill over the paged latent cache in bounded workspace.

Shape legend as in deepseek_v3.py; Tq = new tokens of one sequence, C = prefill_context_chunk.

A prefill chunk's queries see (1) the chunk's own tokens, causally, and (2) the sequence's cached context,
all of it. (1) runs one causal attention over keys expanded from the new tokens' latents (no mask tensor).
(2) walks the context in chunks of at most C latent rows: gather the rows by slot, expand them through
W_UKV = wkv_b into per-head K/V, attend without a mask, and fold the partial result into the running one by
log-sum-exp. The largest tensor built is [max(Tq, C), H, N + Dv], whatever the context length S; the old
form expanded all S rows per chunk and attended with a dense [Tq, S] mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MergeFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, Tq, N + R], k [H, Tk, N + R], v [H, Tk, Dv] -> (out [H, Tq, Dv] in q's dtype, lse float32 [H, Tq]).

    is_causal aligns query i with key i (top-left), which is what a chunk attending to its own tokens needs.
    The fused SDPA kernels are called through the ATen ops that also return the log-sum-exp (the public
    scaled_dot_product_attention drops it)."""
    if q.device.type == "cpu":
        # The CPU flash kernel wants one head size for q, k and v: pad v with zeros, drop the padding after.
        v_dim = v.shape[-1]
        v = F.pad(v, (0, q.shape[-1] - v_dim)) if v_dim < q.shape[-1] else v
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, is_causal, scale=scale
        )[:2]
        return out[0, ..., :v_dim], lse[0]
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, True, 0.0, is_causal, scale=scale
        )[:2]
        return out[0], lse[0, :, : q.shape[1]]  # the CUDA LSE is padded to a multiple of 32 queries
    return attention_with_lse_ref(q, k, v, scale, is_causal)


def attention_with_lse_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_lse in plain torch (fp32 scores [H, Tq, Tk])."""
    scores = torch.einsum("hqd,hkd->hqk", q.float(), k.float()) * scale
    if is_causal:
        num_q, num_k = q.shape[1], k.shape[1]
        allowed = torch.ones(num_q, num_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.einsum("hqk,hkd->hqd", probs, v.float()).to(q.dtype), lse


@dataclass(frozen=True)
class MLAPrefillWeights:
    """What the prefill needs of one MLA layer: the latent split, the up-projection and the scale."""

    wkv_b: Callable[[torch.Tensor], torch.Tensor]  # [n, L] -> [n, H * (N + Dv)]
    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    v_head_dim: int
    softmax_scale: float

    def expand(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv [n, L], k_pe [n, R] -> k [H, n, N + R], v [H, n, Dv]."""
        kv = self.wkv_b(c_kv).view(c_kv.shape[0], self.n_heads, -1)  # [n, H, N + Dv]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.n_heads, -1)], dim=-1)  # [n, H, N + R]
        return k.transpose(0, 1), v.transpose(0, 1)


def context_slots(block_table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [start, end) of a sequence with this block table: int64 [end - start]."""
    positions = torch.arange(start, end, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def prefill_attention(
    weights: MLAPrefillWeights, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
    kv_cache: torch.Tensor, block_table: torch.Tensor, num_context: int, context_chunk: int, merge: MergeFn,
) -> torch.Tensor:
    """One sequence's prefill chunk: q [H, Tq, N + R] with its own keys new_k [H, Tq, N + R] / new_v [H, Tq, Dv]
    over `num_context` cached tokens (positions before the chunk, read from kv_cache) -> [Tq, H, Dv]."""
    scale = weights.softmax_scale
    out, lse = attention_with_lse(q, new_k, new_v, scale, is_causal=True)
    if num_context == 0:
        return out.transpose(0, 1)
    out = out.float()  # the running result stays fp32 across chunks
    flat_cache = kv_cache.view(-1, kv_cache.shape[-1])
    block_size = kv_cache.shape[1]
    for start in range(0, num_context, context_chunk):
        end = min(start + context_chunk, num_context)
        rows = flat_cache[context_slots(block_table, start, end, block_size)].to(q.dtype)  # [C, L + R]
        c_kv, k_pe = rows.split([weights.kv_lora_rank, rows.shape[-1] - weights.kv_lora_rank], dim=-1)
        k, v = weights.expand(c_kv, k_pe)
        chunk_out, chunk_lse = attention_with_lse(q, k, v, scale, is_causal=False)
        out, lse = merge(out, lse, chunk_out, chunk_lse)
    return out.to(q.dtype).transpose(0, 1)
