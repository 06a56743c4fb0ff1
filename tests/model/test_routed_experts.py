"""The dense routed-expert paths (host: sorted runs, device: padded slabs) against a plain loop over experts,
on this worker's slice of the experts (expert parallelism) and on all of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k2ray.model.deepseek_v3 import Kernels, RoutedExperts
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.loader import load_model

NUM_TOKENS = (1, 7, 64)


@pytest.fixture(scope="module")
def args():
    return load_model(tiny_checkpoint_dir(), dtype=torch.float32).args


def make_experts(args, expert_start: int, num_local: int) -> RoutedExperts:
    experts = RoutedExperts(args, expert_start, num_local, False, torch.float32, Kernels.for_backend("torch"))
    gen = torch.Generator().manual_seed(expert_start)
    with torch.no_grad():
        for weight in (experts.w13, experts.w2):
            weight.copy_(torch.randn(weight.shape, generator=gen) / weight.shape[-1] ** 0.5)
    return experts


def loop_reference(experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
    out = torch.zeros_like(x)
    for local in range(experts.num_local_experts):
        token_idx, slot_idx = torch.where(ids == experts.expert_start + local)
        gate_up = F.linear(x[token_idx], experts.w13[local])
        inter = gate_up.shape[-1] // 2
        y = F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], experts.w2[local])
        out.index_add_(0, token_idx, y * weights[token_idx, slot_idx, None])
    return out


def routing(args, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, args.hidden_size, generator=gen)
    ids = torch.rand(num_tokens, args.n_routed_experts, generator=gen).topk(args.num_experts_per_tok, dim=1)[1]
    return x, torch.rand(num_tokens, args.num_experts_per_tok, generator=gen), ids


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("shard", ["all", "first_half", "second_half"])
@torch.inference_mode()
def test_sorted_and_padded_paths_equal_a_loop_over_experts(args, num_tokens: int, shard: str) -> None:
    half = args.n_routed_experts // 2
    start, num_local = {"all": (0, args.n_routed_experts), "first_half": (0, half),
                        "second_half": (half, half)}[shard]
    experts = make_experts(args, start, num_local)
    x, weights, ids = routing(args, num_tokens, num_tokens)
    expected = loop_reference(experts, x, weights, ids)
    # Same matmuls over the same rows, summed per token in the same expert order: bit for bit.
    assert torch.equal(experts(x, weights, ids), expected)
    torch.testing.assert_close(experts._forward_padded(x, weights, ids), expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_padded_path_chunks_tokens(args, monkeypatch) -> None:
    import k2ray.model.deepseek_v3 as deepseek_v3

    experts = make_experts(args, 0, args.n_routed_experts)
    x, weights, ids = routing(args, 13, 0)
    whole = experts._forward_padded(x, weights, ids)
    monkeypatch.setattr(deepseek_v3, "PADDED_MOE_MAX_ROWS", 3 * (args.n_routed_experts + 1))  # chunks of 3
    torch.testing.assert_close(experts._forward_padded(x, weights, ids), whole, rtol=1e-6, atol=1e-6)


@torch.inference_mode()
def test_no_local_pairs_give_zeros(args) -> None:
    half = args.n_routed_experts // 2
    experts = make_experts(args, half, half)
    x, weights, _ = routing(args, 5, 1)
    ids = torch.arange(args.num_experts_per_tok).expand(5, -1).contiguous()  # all below `half`
    assert torch.equal(experts(x, weights, ids), torch.zeros_like(x))
    assert torch.equal(experts._forward_padded(x, weights, ids), torch.zeros_like(x))
