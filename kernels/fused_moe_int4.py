"""Fused INT4 MoE: route tokens to experts, gate/up GEMM, SiLU * mul, down GEMM, weighted combine.

Expert weights are stacked per expert in the checkpoint's pack-quantized layout:
    w13_packed [E, 2I, D / 8], w13_scale [E, 2I, D / group]   rows [0, I) gate_proj, [I, 2I) up_proj
    w2_packed  [E, D, I / 8],  w2_scale  [E, D, I / group]    down_proj
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .int4_layout import K2_GROUP_SIZE, dequantize_int4


def fused_moe_int4_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    routed_scaling_factor: float = 1.0,
    group_size: int = K2_GROUP_SIZE,
) -> torch.Tensor:
    """x [T, D], topk_ids [T, A] int, topk_weights [T, A] -> [T, D] in x.dtype.

    out[t] = routed_scaling_factor * sum_a topk_weights[t, a] * expert_{topk_ids[t, a]}(x[t])
    """
    num_tokens, hidden = x.shape
    num_experts = w13_packed.shape[0]
    inter = w13_packed.shape[1] // 2
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    counts = torch.bincount(topk_ids.flatten(), minlength=num_experts).tolist()
    for e in range(num_experts):
        if counts[e] == 0:
            continue
        token_idx, slot_idx = torch.where(topk_ids == e)
        xe = x[token_idx].to(torch.float32)
        w13 = dequantize_int4(w13_packed[e], w13_scale[e], group_size, dtype=torch.float32)
        w2 = dequantize_int4(w2_packed[e], w2_scale[e], group_size, dtype=torch.float32)
        gate_up = xe @ w13.t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        ye = (h @ w2.t()) * topk_weights[token_idx, slot_idx].to(torch.float32).unsqueeze(-1)
        out.index_add_(0, token_idx, ye)
    return (out * routed_scaling_factor).to(x.dtype)
