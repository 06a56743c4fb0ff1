"""Paged MLA decode attention on CPU: length-sorted groups of sequences under a cache-sized workspace.

Same contract as mla_decode_attention_ref (mla_decode.py): q_latent [B, H, Lkv], q_pe [B, H, R], kv_cache
[num_blocks, block_size, Lkv + R], block_tables [B, max_num_blocks], seq_lens [B] -> out [B, H, Lkv].

The reference copies every sequence's latent rows, padded to the batch's longest, into one [B, S_max, Lkv + R]
tensor and runs three passes over it: for a batch of mixed contexts that is mostly padding, and at 64
sequences of ~1,000 tokens a few hundred MB streamed through memory three times per layer and step. Here the
sequences are sorted by length and cut into groups whose gathered rows fit `group_bytes` (about an L2 cache):
each group's blocks are gathered once (index_select of whole blocks, no copy beyond the group's longest
sequence), and both batched matmuls then read them from cache. A long sequence is a group of its own; short
ones share a group (and the Python overhead of one). Measured on this box, 1 thread, kv_lora_rank 512 + rope
64, 8 heads: 3-5x faster than the reference at 32-64 sequences of 100-2,000 tokens, 2-5x at short contexts.
"""

from __future__ import annotations

import torch

from .mla_decode import check_mla_args

# Gathered latent rows per group, in bytes of fp32: small enough to stay in a core's L2 between the score
# and the output matmul (1 MiB was the fastest of 256 KiB / 1 MiB / 4 MiB measured).
DEFAULT_GROUP_BYTES = 1 << 20
FP32_BYTES = 4


def length_groups(sorted_lens: list[int], rows_per_group: int) -> list[tuple[int, int]]:
    """[start, end) ranges over ascending lengths: each group's padded size (members x its longest) fits
    rows_per_group, except a single sequence longer than that, which is a group of its own."""
    groups = []
    start = 0
    while start < len(sorted_lens):
        end = start + 1
        while end < len(sorted_lens) and (end + 1 - start) * sorted_lens[end] <= rows_per_group:
            end += 1
        groups.append((start, end))
        start = end
    return groups


def mla_decode_attention_grouped(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    max_seq_len: int | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
) -> torch.Tensor:
    """mla_decode_attention_ref without the padded batch copy; every seq_len must be >= 1. fp32 math.

    max_seq_len is accepted for the kernels' common signature; the groups know their own longest."""
    check_mla_args(q_latent, q_pe, kv_cache, block_tables, seq_lens)
    batch, _, kv_lora = q_latent.shape
    block_size, row_width = kv_cache.shape[1], kv_cache.shape[2]
    lens = seq_lens.tolist()
    order = sorted(range(batch), key=lens.__getitem__)
    sorted_lens = [lens[i] for i in order]
    order_t = torch.tensor(order, dtype=torch.int64, device=q_latent.device)
    q = torch.cat([q_latent, q_pe], dim=-1).index_select(0, order_t).float()  # [B, H, Lkv + R], sorted
    tables = block_tables.index_select(0, order_t).long()
    out = torch.empty(q.shape[0], q.shape[1], kv_lora, dtype=torch.float32, device=q.device)
    for start, end in length_groups(sorted_lens, max(1, group_bytes // (row_width * FP32_BYTES))):
        longest = sorted_lens[end - 1]
        num_blocks = -(-longest // block_size)
        rows = kv_cache.index_select(0, tables[start:end, :num_blocks].flatten())
        rows = rows.view(end - start, num_blocks * block_size, row_width)[:, :longest].float()  # [G, S, Lkv + R]
        scores = torch.bmm(q[start:end], rows.transpose(1, 2)).mul_(softmax_scale)  # [G, H, S]
        if sorted_lens[start] != longest:
            group_lens = torch.tensor(sorted_lens[start:end], device=q.device)
            is_padding = torch.arange(longest, device=q.device) >= group_lens.unsqueeze(1)  # [G, S]
            scores.masked_fill_(is_padding.unsqueeze(1), float("-inf"))
        torch.bmm(scores.softmax(dim=-1), rows[..., :kv_lora], out=out[start:end])
    return torch.empty_like(out).index_copy_(0, order_t, out).to(q_latent.dtype)
