from __future__ import annotations

import pytest
import torch
from k2ray.kernels import mla_decode_attention, mla_decode_attention_ref


def _problem(batch, heads, kv_lora, rope, page, seq_lens, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = -(-max(seq_lens) // page)
    num_blocks = batch * pages_per_seq + 3
    kv_cache = torch.randn(num_blocks, page, kv_lora + rope, generator=gen).to(dtype)
    # Shuffled, non-contiguous page ids, as the block pool hands them out.
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * pages_per_seq].view(
        batch, pages_per_seq
    )
    # q_latent / q_pe as views into one [B, H, Lkv + R] buffer: strided like the model's split of q.
    q = torch.randn(batch, heads, kv_lora + rope, generator=gen).to(dtype)
    return q[..., :kv_lora], q[..., kv_lora:], kv_cache, block_tables.to(torch.int32), torch.tensor(seq_lens)


def _check(args, scale: float, device: torch.device, **kwargs) -> None:
    q_latent, q_pe, kv_cache, block_tables, seq_lens = args
    ref = mla_decode_attention_ref(*args, scale)
    got = mla_decode_attention(*(t.to(device) for t in args), scale, **kwargs)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got.float().cpu(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_matches_ref_across_kv_splits(splits: int, kernel_device: torch.device) -> None:
    # 8 splits over 1..21 tokens: leaves some slices empty.
    args = _problem(3, 5, 32, 8, page=4, seq_lens=[1, 9, 21], dtype=torch.bfloat16)
    _check(args, 0.2, kernel_device, num_kv_splits=splits)


@pytest.mark.parametrize(
    "case",
    [(1, 1, 32, 8, 16, [16]), (2, 17, 48, 16, 8, [7, 30]), (1, 4, 64, 8, 1, [5])],
    ids=["m1_one_head", "odd_heads_rank48", "page1"],
)
def test_shapes_and_pages(case: tuple, kernel_device: torch.device) -> None:
    batch, heads, kv_lora, rope, page, seq_lens = case
    _check(_problem(batch, heads, kv_lora, rope, page, seq_lens, torch.bfloat16, seed=1), 0.15, kernel_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype: torch.dtype, kernel_device: torch.device) -> None:
    _check(_problem(2, 3, 32, 8, 4, [6, 11], dtype, seed=2), 0.25, kernel_device, num_kv_splits=2)


def test_rejects_bad_layouts(kernel_device: torch.device) -> None:
    q_latent, q_pe, kv_cache, block_tables, seq_lens = (
        t.to(kernel_device) for t in _problem(1, 2, 32, 8, 4, [3], torch.bfloat16)
    )
    with pytest.raises(AssertionError):
        mla_decode_attention(q_latent, q_pe, kv_cache.float(), block_tables, seq_lens, 1.0)
    with pytest.raises(AssertionError):
        mla_decode_attention(q_latent, q_pe[..., :4], kv_cache, block_tables, seq_lens, 1.0)
    with pytest.raises(AssertionError):
        mla_decode_attention(q_latent, q_pe, kv_cache, block_tables.float(), seq_lens, 1.0)
