"""Write new latent KV rows into the paged cache by slot_mapping.

Cache row = [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]; slot = block_id * block_size + row. The Triton
kernel writes both halves of one token's row per program, straight from the (possibly strided) projections,
so the caller never materialises the concatenation.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton

CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def store_latent_kv_kernel(
    c_kv_ptr, k_pe_ptr, kv_ptr, slot_mapping_ptr, stride_c, stride_pe, stride_slot,
    KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    row = kv_ptr + slot * stride_slot
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    c_kv = tl.load(c_kv_ptr + token * stride_c + offs_l, mask=offs_l < KV_LORA)
    k_pe = tl.load(k_pe_ptr + token * stride_pe + offs_r, mask=offs_r < ROPE)
    tl.store(row + offs_l, c_kv.to(kv_ptr.dtype.element_ty), mask=offs_l < KV_LORA)
    tl.store(row + KV_LORA + offs_r, k_pe.to(kv_ptr.dtype.element_ty), mask=offs_r < ROPE)


def store_latent_kv(
    c_kv: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton twin of store_latent_kv_ref (in place). c_kv / k_pe rows may be strided views."""
    require_triton()
    assert kv_cache.dtype in CACHE_DTYPES and kv_cache.dim() == 3 and kv_cache.is_contiguous(), "bad kv_cache"
    assert c_kv.dtype in CACHE_DTYPES and k_pe.dtype in CACHE_DTYPES, "c_kv / k_pe must be floating point"
    assert c_kv.dim() == 2 and k_pe.dim() == 2 and c_kv.shape[0] == k_pe.shape[0], (
        "want c_kv [T, L], k_pe [T, R]"
    )
    assert c_kv.stride(1) == 1 and k_pe.stride(1) == 1, "c_kv / k_pe rows must be contiguous"
    assert kv_cache.shape[2] == c_kv.shape[1] + k_pe.shape[1], "cache rows must be Lkv + R wide"
    assert slot_mapping.dtype in (torch.int32, torch.int64) and slot_mapping.shape == (c_kv.shape[0],), (
        "bad slots"
    )
    assert slot_mapping.is_contiguous(), "slot_mapping must be contiguous"
    num_tokens, kv_lora = c_kv.shape
    rope = k_pe.shape[1]
    if num_tokens == 0:
        return
    store_latent_kv_kernel[(num_tokens,)](
        c_kv, k_pe, kv_cache, slot_mapping, c_kv.stride(0), k_pe.stride(0), kv_cache.stride(1),
        KV_LORA=kv_lora, ROPE=rope,
        BLOCK_L=triton.next_power_of_2(kv_lora), BLOCK_R=triton.next_power_of_2(rope),
    )  # fmt: skip


def store_latent_kv_ref(
    c_kv: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """c_kv [T, Lkv], k_pe [T, R], kv_cache [num_blocks, block_size, Lkv + R], slot_mapping [T] int64 (in place)."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat[slot_mapping] = torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype)
