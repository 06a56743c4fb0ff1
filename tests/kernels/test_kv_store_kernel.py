from __future__ import annotations

import pytest
import torch
from k2ray.kernels import store_latent_kv, store_latent_kv_ref

KV_LORA, ROPE, PAGE, NUM_BLOCKS = 32, 8, 4, 6


def _inputs(num_tokens: int, dtype: torch.dtype, gen: torch.Generator):
    # c_kv and k_pe as column views of one projection output, like the model's split of kv_a_proj.
    fused = torch.randn(num_tokens, KV_LORA + ROPE + 5, generator=gen).to(dtype)
    return fused[:, :KV_LORA], fused[:, KV_LORA : KV_LORA + ROPE]


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_matches_ref(num_tokens: int, slot_dtype: torch.dtype, kernel_device: torch.device) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    c_kv, k_pe = _inputs(num_tokens, torch.bfloat16, gen)
    cache = torch.randn(NUM_BLOCKS, PAGE, KV_LORA + ROPE, generator=gen).to(torch.bfloat16)
    slots = torch.randperm(NUM_BLOCKS * PAGE, generator=gen)[:num_tokens]
    expected = cache.clone()
    store_latent_kv_ref(c_kv, k_pe, expected, slots)
    got = cache.to(kernel_device)
    store_latent_kv(c_kv.to(kernel_device), k_pe.to(kernel_device), got, slots.to(kernel_device, slot_dtype))
    assert torch.equal(got.cpu(), expected)


def test_casts_to_cache_dtype(kernel_device: torch.device) -> None:
    gen = torch.Generator().manual_seed(5)
    c_kv, k_pe = _inputs(3, torch.float32, gen)
    cache = torch.zeros(NUM_BLOCKS, PAGE, KV_LORA + ROPE, dtype=torch.bfloat16)
    slots = torch.tensor([23, 0, 9])
    expected = cache.clone()
    store_latent_kv_ref(c_kv, k_pe, expected, slots)
    got = cache.to(kernel_device)
    store_latent_kv(c_kv.to(kernel_device), k_pe.to(kernel_device), got, slots.to(kernel_device))
    # One bf16 ulp: the CPU interpreter truncates fp32 -> bf16 where torch rounds to nearest.
    torch.testing.assert_close(got.cpu().float(), expected.float(), rtol=2**-7, atol=0)
    untouched = torch.ones(NUM_BLOCKS * PAGE, dtype=torch.bool)
    untouched[slots] = False
    assert (got.cpu().view(-1, KV_LORA + ROPE)[untouched] == 0).all()


def test_rejects_bad_layouts(kernel_device: torch.device) -> None:
    c_kv = torch.randn(2, KV_LORA, device=kernel_device)
    k_pe = torch.randn(2, ROPE, device=kernel_device)
    cache = torch.zeros(NUM_BLOCKS, PAGE, KV_LORA + ROPE, device=kernel_device)
    slots = torch.tensor([0, 1], device=kernel_device)
    with pytest.raises(AssertionError):
        store_latent_kv(c_kv, k_pe[:, :4], cache, slots)
    with pytest.raises(AssertionError):
        store_latent_kv(c_kv, k_pe, cache, slots.float())
    with pytest.raises(AssertionError):
        store_latent_kv(c_kv.t().contiguous().t(), k_pe, cache, slots)
