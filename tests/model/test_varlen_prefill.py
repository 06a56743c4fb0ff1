"""One varlen call over all prefill chunks of a step against the single-sequence reference forms: the same
rows as prefill_attention per chunk and as the dense form, for chunks of mixed lengths (length groups of
several, a 1-token chunk, one alone), with and without cached context, blocks partially filled."""

from __future__ import annotations

import pytest
import torch
from k2ray.kernels import merge_attention_states_ref
from torch import nn

from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.prefill_attention import MLAPrefillWeights, dense_prefill_attention, prefill_attention
from k2ray.model.varlen_prefill import (
    MAX_GROUPED_CHUNK,
    PADDING_SLACK,
    causal_groups,
    varlen_prefill_attention,
)

HEADS, LATENT, NOPE, ROPE, V_DIM, BLOCK_SIZE = 4, 24, 8, 6, 10, 4
ATOL = RTOL = 1e-5


def _weights(gen: torch.Generator) -> MLAPrefillWeights:
    wkv_b = nn.Linear(LATENT, HEADS * (NOPE + V_DIM), bias=False)
    with torch.no_grad():
        wkv_b.weight.copy_(torch.randn(wkv_b.weight.shape, generator=gen) / LATENT**0.5)
    w = wkv_b.weight.detach().view(HEADS, NOPE + V_DIM, LATENT)
    return MLAPrefillWeights(wkv_b, w[:, :NOPE], w[:, NOPE:], HEADS, LATENT, NOPE, V_DIM, 0.3)


def _step(query_lens: list[int], contexts: list[int], num_decodes: int, chunk: int, form: str, seed: int = 0):
    """A step of `num_decodes` decodes, then the prefill chunks; every sequence's rows written to the cache."""
    gen = torch.Generator().manual_seed(seed)
    lens = [1] * num_decodes + query_lens
    seq_lens = [c + 4 for c in range(num_decodes)] + [q + c for q, c in zip(query_lens, contexts, strict=True)]
    pages = [-(-n // BLOCK_SIZE) for n in seq_lens]
    kv_cache = torch.zeros(sum(pages) + 3, BLOCK_SIZE, LATENT + ROPE)
    ids = torch.randperm(kv_cache.shape[0], generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    new_rows, taken = [], 0
    for s, n in enumerate(seq_lens):
        block_tables[s, : pages[s]] = ids[taken : taken + pages[s]]
        taken += pages[s]
        rows = torch.randn(n, LATENT + ROPE, generator=gen)
        for p in range(n):
            kv_cache[block_tables[s, p // BLOCK_SIZE], p % BLOCK_SIZE] = rows[p]
        if s >= num_decodes:
            new_rows.append(rows[n - lens[s]:])
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(cu), seq_lens=torch.tensor(seq_lens), block_tables=block_tables,
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64), num_decodes=num_decodes, max_seq_len=max(seq_lens),
        query_start_loc_cpu=tuple(cu), seq_lens_cpu=tuple(seq_lens), prefill_context_chunk=chunk,
        prefill_form=form,
    )
    q = torch.randn(HEADS, sum(query_lens), NOPE + ROPE, generator=gen)
    return _weights(gen), q, torch.cat(new_rows), kv_cache, meta


def _per_chunk(weights, q, new_k, new_v, kv_cache, meta: AttentionMetadata, form: str) -> torch.Tensor:
    cu, seq_lens = meta.prefill_query_start_loc, meta.prefill_seq_lens
    tables = meta.block_tables[meta.num_decodes:]
    outs = []
    for s in range(len(seq_lens)):
        a, b = cu[s], cu[s + 1]
        if form == "dense":
            outs.append(dense_prefill_attention(weights, q[:, a:b], kv_cache, tables[s], seq_lens[s]))
        else:
            outs.append(prefill_attention(weights, q[:, a:b], new_k[:, a:b], new_v[:, a:b], kv_cache, tables[s],
                                          seq_lens[s] - (b - a), meta.prefill_context_chunk,
                                          merge_attention_states_ref, form))
    return torch.cat(outs)


STEPS = {
    "one_token_no_context": ([1], [0], 0),
    "one_token_over_context": ([1], [9], 2),
    "mixed": ([5, 5, 6, 6, 1, 1, 40, 3, 7], [0, 3, 0, 8, 0, 17, 0, 4, 12], 3),
    "equal_lengths_all_with_context": ([4, 4, 4, 4], [1, 5, 9, 13], 0),
}


@pytest.mark.parametrize("chunk", [3, 1 << 20], ids=["context_chunk_3", "unchunked"])
@pytest.mark.parametrize("form", ["chunked", "expanded", "absorbed"])
@pytest.mark.parametrize("step", list(STEPS.values()), ids=list(STEPS))
def test_matches_the_per_chunk_reference_and_the_dense_form(step, form: str, chunk: int) -> None:
    query_lens, contexts, num_decodes = step
    weights, q, new_rows, kv_cache, meta = _step(query_lens, contexts, num_decodes, chunk, form)
    new_k, new_v = weights.expand(new_rows[:, :LATENT], new_rows[:, LATENT:])
    got = varlen_prefill_attention(weights, q, new_k, new_v, kv_cache, meta, merge_attention_states_ref)
    assert got.shape == (sum(query_lens), HEADS, V_DIM)
    want = _per_chunk(weights, q, new_k, new_v, kv_cache, meta, form)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    dense = _per_chunk(weights, q, new_k, new_v, kv_cache, meta, "dense")
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)


def test_dense_form_runs_through_the_same_call() -> None:
    weights, q, new_rows, kv_cache, meta = _step(*STEPS["mixed"], chunk=3, form="dense")
    new_k, new_v = weights.expand(new_rows[:, :LATENT], new_rows[:, LATENT:])
    got = varlen_prefill_attention(weights, q, new_k, new_v, kv_cache, meta, merge_attention_states_ref)
    torch.testing.assert_close(got, _per_chunk(weights, q, new_k, new_v, kv_cache, meta, "dense"))


def test_causal_groups_bound_the_padding() -> None:
    lens = [5, 5, 6, 6, 1, 1, 40, 3, 7, 64, 2, 40]
    groups = causal_groups(lens)
    assert sorted(s for g in groups for s in g) == list(range(len(lens)))
    for group in groups:
        group_lens = [lens[s] for s in group]
        assert group_lens == sorted(group_lens)
        assert len(group) * max(group_lens) ** 2 <= (1 + PADDING_SLACK) * sum(n * n for n in group_lens)
        assert len(group) == 1 or max(group_lens) <= MAX_GROUPED_CHUNK
    assert [0, 1] in groups and [2, 3, 8] in groups and [4, 5] in groups
    assert [6] in groups and [11] in groups and [9] in groups  # long chunks run alone, even of one length
