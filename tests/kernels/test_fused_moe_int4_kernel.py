from __future__ import annotations

import importlib

import pytest
import torch
from k2ray.kernels import (
    fused_moe_int4,
    fused_moe_int4_ref,
    moe_align_block_size,
    moe_align_block_size_ref,
    quantize_int4,
)

SCALING = 2.827
GEMV_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "USE_DOT": False}
# import_module: the package attribute `fused_moe_int4` is the launcher, not the module.
moe_module = importlib.import_module("k2ray.kernels.fused_moe_int4")


def _experts(num_experts: int, hidden: int, inter: int, gen: torch.Generator):
    def stack(rows: int, cols: int):
        packed, scale = zip(
            *[quantize_int4(torch.randn(rows, cols, generator=gen) / cols**0.5) for _ in range(num_experts)],
            strict=True,
        )
        return torch.stack(packed), torch.stack(scale)

    return (*stack(2 * inter, hidden), *stack(hidden, inter))


def _routing(num_tokens: int, top_k: int, num_experts: int, gen: torch.Generator):
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    return ids.to(torch.int32), torch.rand(num_tokens, top_k, generator=gen)


@pytest.mark.parametrize(
    "ids",
    [
        [[3, 1], [1, 0], [3, 3]],
        [[0]],
        [[2, 2, 2, 2]] * 5,  # one expert takes everything: several blocks for it, none for the rest
    ],
    ids=["mixed", "single", "one_expert"],
)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_align_matches_ref(ids: list[list[int]], block_size: int) -> None:
    topk_ids = torch.tensor(ids)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, block_size, num_experts=4)
    ref_sorted, ref_experts = moe_align_block_size_ref(topk_ids, block_size, num_experts=4)
    assert num_padded.item() == len(ref_sorted)
    assert sorted_ids[: len(ref_sorted)].tolist() == ref_sorted
    assert expert_ids[: len(ref_experts)].tolist() == ref_experts
    assert (sorted_ids[len(ref_sorted) :] == topk_ids.numel()).all()
    assert sorted_ids.numel() % block_size == 0 and expert_ids.numel() == sorted_ids.numel() // block_size


def test_align_random_matches_ref() -> None:
    gen = torch.Generator().manual_seed(3)
    topk_ids = torch.randint(0, 9, (37, 6), generator=gen)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, 8, num_experts=9)
    ref_sorted, ref_experts = moe_align_block_size_ref(topk_ids, 8, num_experts=9)
    assert sorted_ids[: num_padded.item()].tolist() == ref_sorted
    assert expert_ids[: len(ref_experts)].tolist() == ref_experts


@pytest.mark.parametrize("config", [None, GEMV_CONFIG], ids=["default", "gemv"])
@pytest.mark.parametrize(
    "shape",
    [(1, 2, 8, 64, 96), (5, 3, 8, 96, 64), (40, 4, 4, 64, 32)],
    ids=["decode_t1", "odd_tail", "block_m64"],
)
def test_matches_ref(shape: tuple[int, ...], config: dict | None, kernel_device: torch.device) -> None:
    num_tokens, top_k, num_experts, hidden, inter = shape
    gen = torch.Generator().manual_seed(sum(shape))
    experts = _experts(num_experts, hidden, inter, gen)
    ids, weights = _routing(num_tokens, top_k, num_experts, gen)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    ref = fused_moe_int4_ref(x, ids, weights, *experts, routed_scaling_factor=SCALING)
    dev = [t.to(kernel_device) for t in (x, ids, weights, *experts)]
    got = fused_moe_int4(*dev, routed_scaling_factor=SCALING, config=config)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    bound = 3e-2 * ref.float().abs().max().item()
    torch.testing.assert_close(got.float().cpu(), ref.float(), rtol=3e-2, atol=bound)


def test_fp16_and_token_chunks(kernel_device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_module, "MOE_CHUNK_TOKENS", 3)  # 7 tokens -> chunks of 3, 3, 1
    gen = torch.Generator().manual_seed(11)
    experts = _experts(6, 64, 32, gen)
    ids, weights = _routing(7, 2, 6, gen)
    x = torch.randn(7, 64, generator=gen).to(torch.float16)
    ref = fused_moe_int4_ref(x, ids, weights, *experts, routed_scaling_factor=SCALING)
    got = fused_moe_int4(
        *[t.to(kernel_device) for t in (x, ids, weights, *experts)], routed_scaling_factor=SCALING
    )
    torch.testing.assert_close(
        got.float().cpu(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item()
    )


def test_rejects_bad_layouts(kernel_device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    w13p, w13s, w2p, w2s = (t.to(kernel_device) for t in _experts(2, 64, 32, gen))
    ids, weights = (t.to(kernel_device) for t in _routing(2, 1, 2, gen))
    x = torch.randn(2, 64, device=kernel_device, dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        fused_moe_int4(x, ids, weights, w2p, w2s, w13p, w13s)  # gate/up and down swapped
    with pytest.raises(AssertionError):
        fused_moe_int4(x, ids.float(), weights, w13p, w13s, w2p, w2s)
    with pytest.raises(AssertionError):
        fused_moe_int4(x[:, :32], ids, weights, w13p, w13s, w2p, w2s)
