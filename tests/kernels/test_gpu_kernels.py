"""The compiled kernels on CUDA against their references at K2-like shapes (autotuned configs)."""

from __future__ import annotations

import pytest
import torch
from k2ray.kernels import (
    fused_moe_int4,
    fused_moe_int4_ref,
    mla_decode_attention,
    mla_decode_attention_ref,
    quantize_int4,
    store_latent_kv,
    store_latent_kv_ref,
    w4a16_gemm,
    w4a16_gemm_ref,
)

pytestmark = pytest.mark.gpu
HIDDEN, MOE_INTER, KV_LORA, ROPE, PAGE = 7168, 2048, 512, 64, 64


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(got.float(), ref.float(), rtol=rel, atol=rel * ref.float().abs().max().item())


@pytest.mark.parametrize("m", [1, 8, 33, 300])
@pytest.mark.parametrize("nk", [(2 * MOE_INTER, HIDDEN), (HIDDEN, MOE_INTER)], ids=["gate_up", "down"])
def test_w4a16_gemm_cuda(m: int, nk: tuple[int, int]) -> None:
    n, k = nk
    gen = torch.Generator(device="cuda").manual_seed(m)
    packed, scale = quantize_int4(torch.randn(n, k, device="cuda", generator=gen) / k**0.5)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    _close(w4a16_gemm(x, packed, scale), w4a16_gemm_ref(x, packed, scale), 2e-2)


# Both decode families pinned, whichever the tuner would pick: tensor-core tile and GEMV (FAST_DEQUANT paths).
PINNED_GEMM = [
    {"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4, "GROUP_M": 8, "USE_DOT": True},
    {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "GROUP_M": 8, "USE_DOT": False},
]
PINNED_MOE = [
    {"BLOCK_N": 64, "BLOCK_K": 128, "USE_DOT": True},
    {"BLOCK_N": 32, "BLOCK_K": 128, "USE_DOT": False},
]


@pytest.mark.parametrize("config", PINNED_GEMM, ids=["dot", "gemv"])
def test_w4a16_gemm_cuda_pinned_decode(config: dict) -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    packed, scale = quantize_int4(
        torch.randn(HIDDEN, MOE_INTER, device="cuda", generator=gen) / MOE_INTER**0.5
    )
    x = torch.randn(1, MOE_INTER, device="cuda", generator=gen).to(torch.bfloat16)
    _close(w4a16_gemm(x, packed, scale, config=config), w4a16_gemm_ref(x, packed, scale), 2e-2)


@pytest.mark.parametrize("config", [None, *PINNED_MOE], ids=["tuned", "dot", "gemv"])
@pytest.mark.parametrize("num_tokens", [1, 64, 700])
def test_fused_moe_int4_cuda(num_tokens: int, config: dict | None) -> None:
    if config is not None and num_tokens > 64:
        pytest.skip("pinned configs are decode checks")
    num_experts, top_k, inter = 16, 8, MOE_INTER // 2
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)

    def stack(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [
            quantize_int4(torch.randn(rows, cols, device="cuda", generator=gen) / cols**0.5)
            for _ in range(num_experts)
        ]
        return torch.stack([p for p, _ in parts]), torch.stack([s for _, s in parts])

    experts = (*stack(2 * inter, HIDDEN), *stack(HIDDEN, inter))
    scores = torch.rand(num_tokens, num_experts, device="cuda", generator=gen)
    weights, ids = scores.topk(top_k, dim=-1)
    x = torch.randn(num_tokens, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
    got = fused_moe_int4(x, ids, weights, *experts, routed_scaling_factor=2.827, config=config)
    _close(got, fused_moe_int4_ref(x, ids, weights, *experts, routed_scaling_factor=2.827), 3e-2)


@pytest.mark.parametrize("batch", [1, 16])
def test_mla_decode_attention_cuda(batch: int) -> None:
    heads, max_len = 64, 5000
    gen = torch.Generator(device="cuda").manual_seed(batch)
    pages = -(-max_len // PAGE)
    kv_cache = torch.randn(batch * pages + 7, PAGE, KV_LORA + ROPE, device="cuda", generator=gen).to(
        torch.bfloat16
    )
    block_tables = torch.randperm(batch * pages + 7, device="cuda", generator=gen)[: batch * pages]
    block_tables = block_tables.view(batch, pages).to(torch.int32)
    seq_lens = torch.randint(1, max_len + 1, (batch,), device="cuda", generator=gen, dtype=torch.int32)
    q = torch.randn(batch, heads, KV_LORA + ROPE, device="cuda", generator=gen).to(torch.bfloat16)
    args = (q[..., :KV_LORA], q[..., KV_LORA:], kv_cache, block_tables, seq_lens, 0.1147)
    _close(mla_decode_attention(*args), mla_decode_attention_ref(*args), 2e-2)


def test_store_latent_kv_cuda() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.zeros(64, PAGE, KV_LORA + ROPE, device="cuda", dtype=torch.bfloat16)
    fused = torch.randn(300, KV_LORA + ROPE, device="cuda", generator=gen).to(torch.bfloat16)
    slots = torch.randperm(64 * PAGE, device="cuda", generator=gen)[:300]
    expected = cache.clone()
    store_latent_kv_ref(fused[:, :KV_LORA], fused[:, KV_LORA:], expected, slots)
    store_latent_kv(fused[:, :KV_LORA], fused[:, KV_LORA:], cache, slots)
    assert torch.equal(cache, expected)
