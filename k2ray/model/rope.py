"""Rotary embeddings with DeepSeek-V3 YaRN, matching transformers' DeepseekV3 numerically.

    inv_freq [R / 2]: per rotary pair; YaRN blends interpolated (/ factor) and original frequencies with a
                      linear ramp between the beta_fast / beta_slow correction dims.
    cos/sin  [T, R / 2]: angle = position * inv_freq, times the YaRN cos/sin multiplier (attention_factor).
    softmax scale: qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2.
"""

from __future__ import annotations

import math

import torch

from .args import ModelArgs, YarnScaling

# transformers widens a degenerate ramp (low == high) by this much to avoid dividing by zero.
RAMP_EPSILON = 0.001
# YaRN's attention temperature: mscale(s) = YARN_MSCALE_COEF * m * ln(s) + 1.
YARN_MSCALE_COEF = 0.1


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return YARN_MSCALE_COEF * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """float32 [qk_rope_head_dim / 2]."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    yarn = args.rope_scaling
    if yarn is None:
        return inv_freq
    orig = yarn.original_max_position_embeddings
    low = _correction_dim(yarn.beta_fast, dim, base, orig)
    high = _correction_dim(yarn.beta_slow, dim, base, orig)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += RAMP_EPSILON
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1 for high-frequency pairs (extrapolate), 0 for low (interpolate)
    return (inv_freq / yarn.factor) * (1 - keep_original) + inv_freq * keep_original


def yarn_attention_factor(yarn: YarnScaling | None) -> float:
    """Multiplier on cos/sin (1.0 for K2, whose mscale == mscale_all_dim)."""
    if yarn is None:
        return 1.0
    if yarn.attention_factor is not None:
        return float(yarn.attention_factor)
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_get_mscale(yarn.factor, yarn.mscale) / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_get_mscale(yarn.factor)


def softmax_scale(args: ModelArgs) -> float:
    scale = args.qk_head_dim**-0.5
    yarn = args.rope_scaling
    if yarn is not None and yarn.mscale_all_dim:
        scale = scale * yarn_get_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin float32 [T, R / 2]."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, ..., R] with cos/sin [T, R / 2] -> [T, ..., R] in x.dtype.

    interleave=True (DeepSeek/K2 weights): pair i is (x[2i], x[2i+1]); the result is written de-interleaved
    ([rotated evens | rotated odds]) exactly as transformers does. q and k get the same permutation, so
    q.k is unchanged and the cached k_pe stays consistent with the query.
    interleave=False: pair i is (x[i], x[i + R/2]) (rotate_half).
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
