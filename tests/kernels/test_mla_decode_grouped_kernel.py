"""The CPU decode path (length-sorted groups over the paged cache) against mla_decode_attention_ref."""

from __future__ import annotations

import pytest
import torch
from k2ray.kernels import mla_decode_attention_grouped, mla_decode_attention_ref
from k2ray.kernels.mla_decode_grouped import length_groups


def paged_problem(heads, kv_lora, rope, page, seq_lens, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    pages = [-(-n // page) for n in seq_lens]
    num_blocks = sum(pages) + 5
    kv_cache = torch.randn(num_blocks, page, kv_lora + rope, generator=gen).to(dtype)
    # Shuffled page ids; rows past each sequence's pages hold a valid id that must not be read.
    ids = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((batch, max(pages) + 2), int(ids[-1]), dtype=torch.int32)
    taken = 0
    for b, n in enumerate(pages):
        block_tables[b, :n] = ids[taken : taken + n]
        taken += n
    q = torch.randn(batch, heads, kv_lora + rope, generator=gen).to(dtype)
    return q[..., :kv_lora], q[..., kv_lora:], kv_cache, block_tables, torch.tensor(seq_lens)


# Lengths: one token, exactly one block, one past a block, a long one alone, ties, unsorted order.
CASES = {
    "batch_of_one_token": [1],
    "batch_of_one_long": [37],
    "mixed": [9, 1, 64, 17, 16, 3, 40, 9, 2],
    "all_partial_blocks": [5, 13, 21, 29],
}


@pytest.mark.parametrize("group_bytes", [1, 4096, 1 << 20], ids=["one_per_group", "small_groups", "one_group"])
@pytest.mark.parametrize("lens", list(CASES.values()), ids=list(CASES))
def test_matches_ref(lens: list[int], group_bytes: int) -> None:
    args = paged_problem(heads=6, kv_lora=32, rope=8, page=8, seq_lens=lens, dtype=torch.float32)
    want = mla_decode_attention_ref(*args, 0.3, max_seq_len=max(lens))
    got = mla_decode_attention_grouped(*args, 0.3, group_bytes=group_bytes)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_k2_widths_in_bf16() -> None:
    lens = [100, 250, 3, 1, 180]
    args = paged_problem(heads=16, kv_lora=512, rope=64, page=16, seq_lens=lens, dtype=torch.bfloat16)
    want = mla_decode_attention_ref(*args, 0.05)
    got = mla_decode_attention_grouped(*args, 0.05)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_empty_batch() -> None:
    q = torch.zeros(0, 4, 16)
    out = mla_decode_attention_grouped(q, torch.zeros(0, 4, 8), torch.zeros(3, 4, 24),
                                       torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int64), 1.0)
    assert out.shape == (0, 4, 16)


def test_rejects_bad_layout() -> None:
    q_latent, q_pe, kv_cache, block_tables, seq_lens = paged_problem(2, 16, 8, 4, [3, 5], torch.float32)
    with pytest.raises(AssertionError, match="Lkv \\+ R"):
        mla_decode_attention_grouped(q_latent, q_pe[..., :4], kv_cache, block_tables, seq_lens, 1.0)
    with pytest.raises(AssertionError, match="dtypes"):
        mla_decode_attention_grouped(q_latent, q_pe, kv_cache.double(), block_tables, seq_lens, 1.0)


def test_groups_fit_the_budget_and_cover_every_sequence() -> None:
    lens = sorted([1, 2, 2, 7, 30, 31, 90, 400])
    groups = length_groups(lens, rows_per_group=64)
    assert [i for start, end in groups for i in range(start, end)] == list(range(len(lens)))
    for start, end in groups:
        assert end - start == 1 or (end - start) * lens[end - 1] <= 64
    assert (7, 8) in groups  # longer than the budget: alone
