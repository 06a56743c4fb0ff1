"""MLA prefill over the paged latent cache in bounded workspace.

Shape legend as in deepseek_v3.py; Tq = new tokens of one sequence, C = prefill_context_chunk.

A prefill chunk's queries see (1) the chunk's own tokens, causally, and (2) the sequence's cached context,
all of it. (1) runs one causal attention over keys expanded from the new tokens' latents (no mask tensor).
(2) walks the context in chunks of at most C latent rows: gather the rows by slot, expand them through
W_UKV = wkv_b into per-head K/V (or, for few new tokens over a long context, absorb W_UK into q and attend
over the latent rows as they are), attend without a mask, and fold the partial result into the running one by
log-sum-exp. The largest tensor built is [max(Tq, C), H, N + Dv], whatever the context length S; the old
form expanded all S rows per chunk and attended with a dense [Tq, S] mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_metadata import PrefillForm

MergeFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, Tq, N + R], k [H, Tk, N + R], v [H, Tk, Dv] -> (out [H, Tq, Dv] in q's dtype, lse float32 [H, Tq]).

    is_causal aligns query i with key i (top-left), which is what a chunk attending to its own tokens needs."""
    out, lse = batched_attention_with_lse(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale, is_causal)
    return out[0], lse[0]


def batched_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_lse over a leading batch axis: q [G, H, Tq, N + R], k [G, H, Tk, N + R], v [G, H, Tk, Dv]
    -> (out [G, H, Tq, Dv], lse float32 [G, H, Tq]). The fused SDPA kernels are called through the ATen ops
    that also return the log-sum-exp (the public scaled_dot_product_attention drops it)."""
    if q.device.type == "cpu":
        # The CPU flash kernel wants one head size for q, k and v: pad v with zeros, drop the padding after.
        v_dim = v.shape[-1]
        v = F.pad(v, (0, q.shape[-1] - v_dim)) if v_dim < q.shape[-1] else v
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
                                                                              scale=scale)[:2]
        return out[..., :v_dim], lse
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, is_causal, scale=scale
        )[:2]
        return out, lse[..., : q.shape[2]]  # the CUDA LSE is padded to a multiple of 32 queries
    return attention_with_lse_ref(q, k, v, scale, is_causal)


def attention_with_lse_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batched_)attention_with_lse in plain torch (fp32 scores [..., H, Tq, Tk])."""
    scores = torch.einsum("...hqd,...hkd->...hqk", q.float(), k.float()) * scale
    if is_causal:
        num_q, num_k = q.shape[-2], k.shape[-2]
        allowed = torch.ones(num_q, num_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.einsum("...hqk,...hkd->...hqd", probs, v.float()).to(q.dtype), lse


@dataclass(frozen=True)
class MLAPrefillWeights:
    """What the prefill needs of one MLA layer: the latent split, the up-projection and the scale."""

    wkv_b: Callable[[torch.Tensor], torch.Tensor]  # [n, L] -> [n, H * (N + Dv)]
    w_uk: torch.Tensor  # [H, N, L], wkv_b's K rows per head
    w_uv: torch.Tensor  # [H, Dv, L], wkv_b's V rows per head
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

    def absorbed_is_cheaper(self, num_new: int, num_context: int, rope_dim: int) -> bool:
        """Multiply-adds of the context part per head. Expanded: S (L (N + Dv) + Tq (N + R + Dv)). Absorbed:
        Tq (S (2L + R) + L (N + Dv)): q into the latent space and the result out of it once, attention over the
        latent rows as they are. Few new tokens over a long context absorb (vLLM's MLA backend makes the same
        choice by the ratio of new to cached tokens); for K2 the break-even is about 170 new tokens."""
        lat, nope, v = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        expanded = num_context * (lat * (nope + v) + num_new * (nope + rope_dim + v))
        absorbed = num_new * (num_context * (2 * lat + rope_dim) + lat * (nope + v))
        return absorbed < expanded


def context_slots(block_table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [start, end) of a sequence with this block table: int64 [end - start]."""
    positions = torch.arange(start, end, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def _context_rows(kv_cache: torch.Tensor, block_table: torch.Tensor, num_context: int, context_chunk: int,
                  dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The cached context's latent rows, at most context_chunk at a time: [C, L + R] each."""
    flat_cache = kv_cache.view(-1, kv_cache.shape[-1])
    for start in range(0, num_context, context_chunk):
        end = min(start + context_chunk, num_context)
        yield flat_cache[context_slots(block_table, start, end, kv_cache.shape[1])].to(dtype)


def _fold(state: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor, lse: torch.Tensor,
          merge: MergeFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one chunk's (out, lse) into the running fp32 result."""
    return (out.float(), lse) if state is None else merge(*state, out, lse)


def _expanded_context(weights: MLAPrefillWeights, q: torch.Tensor, chunks: Iterator[torch.Tensor],
                      merge: MergeFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's rows up-projected into per-head K/V [H, C, N + R] / [H, C, Dv] -> (out [H, Tq, Dv], lse)."""
    state = None
    for rows in chunks:
        c_kv, k_pe = rows.split([weights.kv_lora_rank, rows.shape[-1] - weights.kv_lora_rank], dim=-1)
        k, v = weights.expand(c_kv, k_pe)
        state = _fold(state, *attention_with_lse(q, k, v, weights.softmax_scale, is_causal=False), merge)
    return state


def _absorbed_context(weights: MLAPrefillWeights, q: torch.Tensor, chunks: Iterator[torch.Tensor],
                      merge: MergeFn) -> tuple[torch.Tensor, torch.Tensor]:
    """q absorbed into the latent space, [q_nope W_UK, q_pe], against the rows themselves (keys [c_kv, k_pe],
    values c_kv). Every head reads the same rows, so the heads go into the query axis: one attention of H * Tq
    queries over [C, L + R], nothing per head. The merged latent result leaves through W_UV once."""
    nope, lat = weights.qk_nope_head_dim, weights.kv_lora_rank
    num_heads, num_new = q.shape[:2]
    q_latent = torch.einsum("hqn,hnl->hql", q[..., :nope], weights.w_uk.to(q.dtype))
    q_absorbed = torch.cat([q_latent, q[..., nope:]], dim=-1).reshape(1, num_heads * num_new, -1)
    state = None
    for rows in chunks:
        out, lse = attention_with_lse(q_absorbed, rows.unsqueeze(0), rows[:, :lat].unsqueeze(0),
                                      weights.softmax_scale, is_causal=False)  # [1, H * Tq, L], [1, H * Tq]
        state = _fold(state, out.reshape(num_heads, num_new, lat), lse.reshape(num_heads, num_new), merge)
    out_latent, lse = state
    return torch.einsum("hql,hvl->hqv", out_latent, weights.w_uv.float()).contiguous(), lse


def context_attention(
    weights: MLAPrefillWeights, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
    num_context: int, context_chunk: int, merge: MergeFn, form: PrefillForm = "chunked",
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, Tq, N + R] of one sequence over its first `num_context` (>= 1) cached tokens, read from kv_cache
    at most context_chunk rows at a time -> (out float32 [H, Tq, Dv], lse [H, Tq]). Attended expanded or
    absorbed, whichever is cheaper ("chunked"), or as `form` forces."""
    rope_dim = q.shape[-1] - weights.qk_nope_head_dim
    absorbed = form == "absorbed" or (form == "chunked"
                                      and weights.absorbed_is_cheaper(q.shape[1], num_context, rope_dim))
    context = _absorbed_context if absorbed else _expanded_context
    return context(weights, q, _context_rows(kv_cache, block_table, num_context, context_chunk, q.dtype), merge)


def prefill_attention(
    weights: MLAPrefillWeights, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
    kv_cache: torch.Tensor, block_table: torch.Tensor, num_context: int, context_chunk: int, merge: MergeFn,
    form: PrefillForm = "chunked",
) -> torch.Tensor:
    """One sequence's prefill chunk: q [H, Tq, N + R] with its own keys new_k [H, Tq, N + R] / new_v [H, Tq, Dv]
    over `num_context` cached tokens (positions before the chunk, read from kv_cache) -> [Tq, H, Dv]. The model
    runs all of a step's chunks through varlen_prefill.py; this single-sequence form is its reference."""
    out, lse = attention_with_lse(q, new_k, new_v, weights.softmax_scale, is_causal=True)
    if num_context == 0:
        return out.transpose(0, 1)
    out, _ = merge(out.float(), lse, *context_attention(weights, q, kv_cache, block_table, num_context,
                                                         context_chunk, merge, form))
    return out.to(q.dtype).transpose(0, 1)


def dense_prefill_attention(
    weights: MLAPrefillWeights, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
) -> torch.Tensor:
    """The reference form (prefill_form "dense"): q [H, Tq, N + R] of the last Tq of `seq_len` cached tokens
    -> [Tq, H, Dv]. Gathers and expands all S = seq_len latent rows and attends with a dense [Tq, S] mask:
    O(S) workspace per call, O(S^2 / Tq) expansion over a prompt."""
    num_q = q.shape[1]
    block_size = kv_cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    rows = kv_cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len].to(q.dtype)  # [S, L + R]
    c_kv, k_pe = rows.split([weights.kv_lora_rank, rows.shape[-1] - weights.kv_lora_rank], dim=-1)
    k, v = weights.expand(c_kv, k_pe)  # [H, S, N + R], [H, S, Dv]
    # Query i sits at position seq_len - Tq + i and sees keys 0 .. seq_len - Tq + i.
    q_pos = torch.arange(num_q, device=q.device).unsqueeze(1) + (seq_len - num_q)
    mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [Tq, S]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=weights.softmax_scale)  # [H, Tq, Dv]
    return out.transpose(0, 1)
