"""The C decode kernel (paged latent cache read in place) against mla_decode_attention_ref."""

from __future__ import annotations

import shutil

import pytest
import torch
from k2ray.kernels import mla_decode_attention_cpu, mla_decode_attention_ref
from k2ray.kernels.mla_decode_cpu import native_library, runs_native
from test_mla_decode_grouped_kernel import paged_problem

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="builds its library with the system C compiler")

# Lengths around the 4-row score tiles and the blocks: one token, a tile, a block, one past, long, unsorted.
CASES = {
    "one_token": [1],
    "tiles_and_blocks": [4, 5, 16, 17, 3],
    "mixed": [9, 1, 64, 130, 16, 2, 40, 33],
    "long": [700, 12],
}


@pytest.fixture(params=[1, 2, 3], ids=["1_thread", "2_threads", "3_threads"])
def num_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_library_builds_here() -> None:
    assert native_library() is not None


@pytest.mark.parametrize(("kv_lora", "rope"), [(64, 16), (32, 8), (40, 12)], ids=["vector_widths", "k2_tiny", "odd"])
@pytest.mark.parametrize("heads", [1, 3, 8, 12], ids=lambda h: f"{h}_heads")
@pytest.mark.parametrize("lens", list(CASES.values()), ids=list(CASES))
def test_matches_ref(lens: list[int], heads: int, kv_lora: int, rope: int, num_threads: int) -> None:
    args = paged_problem(heads=heads, kv_lora=kv_lora, rope=rope, page=16, seq_lens=lens, dtype=torch.float32)
    assert runs_native(*args[:3])
    want = mla_decode_attention_ref(*args, 0.3, max_seq_len=max(lens))
    got = mla_decode_attention_cpu(*args, 0.3)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page", [8, 32])
def test_k2_widths_and_other_block_sizes(page: int) -> None:
    lens = [100, 250, 3, 1, 180]
    args = paged_problem(heads=16, kv_lora=512, rope=64, page=page, seq_lens=lens, dtype=torch.float32)
    torch.testing.assert_close(mla_decode_attention_cpu(*args, 0.05), mla_decode_attention_ref(*args, 0.05),
                               rtol=1e-5, atol=1e-5)


def test_int64_tables_and_lens() -> None:
    q_latent, q_pe, kv_cache, block_tables, seq_lens = paged_problem(4, 32, 16, 16, [20, 7], torch.float32)
    args = (q_latent, q_pe, kv_cache, block_tables.long(), seq_lens.long())
    torch.testing.assert_close(mla_decode_attention_cpu(*args, 0.2), mla_decode_attention_ref(*args, 0.2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_run_the_torch_kernel(dtype: torch.dtype) -> None:
    args = paged_problem(heads=4, kv_lora=64, rope=16, page=8, seq_lens=[9, 30], dtype=dtype)
    assert not runs_native(*args[:3])
    got = mla_decode_attention_cpu(*args, 0.2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), mla_decode_attention_ref(*args, 0.2).float(), rtol=2e-2, atol=2e-2)


def test_rejects_tables_the_cache_cannot_hold() -> None:
    q_latent, q_pe, kv_cache, block_tables, seq_lens = paged_problem(2, 32, 16, 8, [3, 12], torch.float32)
    bad_tables = block_tables.clone()
    bad_tables[1, 0] = kv_cache.shape[0]
    with pytest.raises(IndexError, match="block ids"):
        mla_decode_attention_cpu(q_latent, q_pe, kv_cache, bad_tables, seq_lens, 1.0)
    too_long = torch.tensor([3, block_tables.shape[1] * 8 + 1])
    with pytest.raises(IndexError, match="seq_lens"):
        mla_decode_attention_cpu(q_latent, q_pe, kv_cache, block_tables, too_long, 1.0)
    with pytest.raises(IndexError, match="seq_lens"):
        mla_decode_attention_cpu(q_latent, q_pe, kv_cache, block_tables, torch.tensor([0, 12]), 1.0)


def test_empty_batch() -> None:
    out = mla_decode_attention_cpu(torch.zeros(0, 4, 32), torch.zeros(0, 4, 16), torch.zeros(3, 4, 48),
                                   torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int64), 1.0)
    assert out.shape == (0, 4, 32)
