"""Batched varlen MLA prefill: all prefill chunks of a step in one call, located by cumulative query offsets.

Shape legend as in deepseek_v3.py; Tp = the step's prefill tokens, Tq = one chunk's, G = chunks in a group.

The step's prefill rows are flat ([H, Tp, ...]); chunk s owns rows [cu[s], cu[s + 1]) of the
AttentionMetadata's query offsets (cu_seqlens_q, as flash_attn_varlen and vLLM's MLA prefill take them).
(1) Each chunk attends to its own tokens causally. CPU SDPA has no varlen form, so the chunks are sorted by
length and cut into groups whose padded work (G x longest^2) stays within PADDING_SLACK of their real work:
a group of several is one batched call over right-padded [G, H, max Tq, ...] rows, exact because with the
top-left causal mask a real query never sees a padded key; a chunk alone runs on its rows in place. Measured
(1 thread, 8 heads): 64 chunks of 20-24 tokens in one call 2.4x faster than a call each; one call over 32
chunks of 16-64 tokens (padded up to 4x) 2.8x slower, hence the groups.
(2) A chunk with cached context reads it from the latent cache in the bounded workspace of
prefill_attention.py and folds it in by log-sum-exp.
"""

from __future__ import annotations

import torch

from .attention_metadata import AttentionMetadata
from .prefill_attention import (
    MergeFn,
    MLAPrefillWeights,
    attention_with_lse,
    batched_attention_with_lse,
    context_attention,
    dense_prefill_attention,
)

# A group's padded causal work may exceed its members' own by this fraction.
PADDING_SLACK = 0.25
# Only chunks this short share a call: there the per-call cost dominates (8-token chunks: 1.5-2.6x faster
# batched); from 32 tokens on, one batched call measured slower than a call per chunk.
MAX_GROUPED_CHUNK = 16


def causal_groups(lens: list[int]) -> list[list[int]]:
    """Chunk indices grouped by length (each group ascending): G x longest^2 <= (1 + PADDING_SLACK) x the sum
    of the members' squared lengths, and no member longer than MAX_GROUPED_CHUNK unless alone."""
    order = sorted(range(len(lens)), key=lens.__getitem__)
    groups: list[list[int]] = []
    work = 0
    for seq in order:
        n = lens[seq]
        if groups and n <= MAX_GROUPED_CHUNK and (len(groups[-1]) + 1) * n * n <= (1 + PADDING_SLACK) * (
                work + n * n):
            groups[-1].append(seq)
            work += n * n
        else:
            groups.append([seq])
            work = n * n
    return groups


def _attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: tuple[int, ...], group: list[int],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batched causal call over the group's chunks, right-padded to its longest -> (the real rows' indices
    [n], their out [H, n, Dv], lse [H, n]). Indices are built on the host: no device sync."""
    lens = [cu[s + 1] - cu[s] for s in group]
    longest, num_heads = max(lens), q.shape[0]
    # Padded slot (member, i) reads row cu[member] + i, or the member's last row past its end.
    padded_rows = [cu[s] + min(i, n - 1) for s, n in zip(group, lens, strict=True) for i in range(longest)]
    real_slots = [g * longest + i for g, n in enumerate(lens) for i in range(n)]
    real_rows = [cu[s] + i for s, n in zip(group, lens, strict=True) for i in range(n)]
    rows, slots, dest = (torch.tensor(x, dtype=torch.int64, device=q.device)
                         for x in (padded_rows, real_slots, real_rows))

    def padded(t: torch.Tensor) -> torch.Tensor:  # [H, Tp, d] -> [G, H, longest, d]
        return t.index_select(1, rows).view(num_heads, len(group), longest, -1).transpose(0, 1)

    out, lse = batched_attention_with_lse(padded(q), padded(k), padded(v), scale, is_causal=True)
    out = out.transpose(0, 1).flatten(1, 2).index_select(1, slots)  # [H, n, Dv]
    return dest, out, lse.transpose(0, 1).flatten(1, 2).index_select(1, slots)


def own_tokens_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: tuple[int, ...], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of every chunk over its own rows: q / k [H, Tp, N + R], v [H, Tp, Dv], cu [S + 1]
    -> (out [H, Tp, Dv] in q's dtype, lse float32 [H, Tp])."""
    num_heads, num_tokens = q.shape[:2]
    out = q.new_empty(num_heads, num_tokens, v.shape[-1])
    lse = torch.empty(num_heads, num_tokens, dtype=torch.float32, device=q.device)
    for group in causal_groups([cu[s + 1] - cu[s] for s in range(len(cu) - 1)]):
        if len(group) == 1:
            start, end = cu[group[0]], cu[group[0] + 1]
            out[:, start:end], lse[:, start:end] = attention_with_lse(
                q[:, start:end], k[:, start:end], v[:, start:end], scale, is_causal=True)
            continue
        real_rows, group_out, group_lse = _attend_padded(q, k, v, cu, group, scale)
        out.index_copy_(1, real_rows, group_out.to(out.dtype))
        lse.index_copy_(1, real_rows, group_lse)
    return out, lse


def varlen_prefill_attention(
    weights: MLAPrefillWeights, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
    kv_cache: torch.Tensor, meta: AttentionMetadata, merge: MergeFn,
) -> torch.Tensor:
    """All prefill chunks of the step (the sequences after meta's decodes): q [H, Tp, N + R] with their own keys
    new_k [H, Tp, N + R] / new_v [H, Tp, Dv], every chunk over its cached context too -> [Tp, H, Dv]."""
    cu, seq_lens = meta.prefill_query_start_loc, meta.prefill_seq_lens
    block_tables = meta.block_tables[meta.num_decodes:]
    if meta.prefill_form == "dense":
        return torch.cat([dense_prefill_attention(weights, q[:, cu[s]:cu[s + 1]], kv_cache, block_tables[s],
                                                  seq_lens[s]) for s in range(len(seq_lens))])
    out, lse = own_tokens_attention(q, new_k, new_v, cu, weights.softmax_scale)
    has_context = [s for s in range(len(seq_lens)) if seq_lens[s] > cu[s + 1] - cu[s]]
    if not has_context:
        return out.transpose(0, 1)
    out = out.float()
    for s in has_context:
        start, end = cu[s], cu[s + 1]
        context = context_attention(weights, q[:, start:end], kv_cache, block_tables[s],
                                    seq_lens[s] - (end - start), meta.prefill_context_chunk, merge,
                                    meta.prefill_form)
        out[:, start:end], _ = merge(out[:, start:end], lse[:, start:end], *context)
    return out.to(q.dtype).transpose(0, 1)
