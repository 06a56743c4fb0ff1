"""W4A16 GEMM: y = x @ dequant(W).T over the checkpoint's own pack-quantized INT4 layout."""

from __future__ import annotations

import torch

from .int4_layout import K2_GROUP_SIZE, dequantize_int4


def w4a16_gemm_ref(
    x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int = K2_GROUP_SIZE
) -> torch.Tensor:
    """x [M, K], weight_packed int32 [N, K / 8], weight_scale [N, K / group_size] -> [M, N] in x.dtype."""
    w = dequantize_int4(weight_packed, weight_scale, group_size, dtype=torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
