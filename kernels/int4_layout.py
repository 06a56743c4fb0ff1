"""compressed-tensors `pack-quantized` INT4 layout, as the Kimi K2 Thinking checkpoint stores it.

weight_packed: int32 [N, K / 8]   column 8j+i lives in bits [4i, 4i+3] of word j (LSB first)
stored nibble: q + 8              q in [-8, 7], symmetric, no zero point
weight_scale:  [N, K / group_size] bf16; w[n, k] = q[n, k] * scale[n, k // group_size]
"""

from __future__ import annotations

import torch

NUM_BITS = 4
PACK_FACTOR = 32 // NUM_BITS  # nibbles per int32 word
INT4_OFFSET = 1 << (NUM_BITS - 1)  # stored = q + 8
INT4_MIN = -INT4_OFFSET
INT4_MAX = INT4_OFFSET - 1
K2_GROUP_SIZE = 32

_SHIFTS = torch.arange(PACK_FACTOR, dtype=torch.int32) * NUM_BITS


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> int32 [N, K / 8], LSB-first nibbles of q + 8."""
    assert q.dim() == 2 and q.shape[1] % PACK_FACTOR == 0, f"K must divide by {PACK_FACTOR}: {tuple(q.shape)}"
    assert int(q.min()) >= INT4_MIN and int(q.max()) <= INT4_MAX, "values outside the int4 range"
    n, k = q.shape
    nibbles = (q.to(torch.int64) + INT4_OFFSET).view(n, k // PACK_FACTOR, PACK_FACTOR)
    words = (nibbles << _SHIFTS.to(q.device, torch.int64)).sum(dim=-1)
    # Wrap into the signed int32 range: the top nibble sets the sign bit.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K / 8] -> int8 [N, K] in [-8, 7]."""
    assert packed.dtype == torch.int32 and packed.dim() == 2, f"want int32 [N, K/8], got {packed.dtype}"
    n, kw = packed.shape
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (nibbles - INT4_OFFSET).to(torch.int8).view(n, kw * PACK_FACTOR)


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = K2_GROUP_SIZE,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(int32 [N, K / 8], [N, K / group_size]) -> [N, K] in `dtype` (default: the scale's dtype)."""
    q = unpack_int4(packed)
    n, k = q.shape
    assert scale.shape == (n, k // group_size), (
        f"scale {tuple(scale.shape)} does not match [N={n}, K/{group_size}]"
    )
    out_dtype = dtype or scale.dtype
    w = q.view(n, k // group_size, group_size).to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    return w.view(n, k).to(out_dtype)


def quantize_int4(w: torch.Tensor, group_size: int = K2_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric min-max group quantization: [N, K] -> (int32 packed [N, K / 8], bf16 scale [N, K / group])."""
    assert w.dim() == 2 and w.shape[1] % group_size == 0, f"K must divide by group_size={group_size}"
    n, k = w.shape
    groups = w.to(torch.float32).view(n, k // group_size, group_size)
    absmax = groups.abs().amax(dim=-1)
    # Map the largest magnitude to -8 / 7 the way compressed-tensors' minmax observer does for
    # symmetric int4: scale = absmax / ((q_max - q_min) / 2).
    scale = _bf16_at_least((absmax / ((INT4_MAX - INT4_MIN) / 2)).clamp(min=torch.finfo(torch.float32).tiny))
    # Integers come from the scale as stored: every weight then lies within half a step of q * scale.
    q = torch.round(groups / scale.to(torch.float32).unsqueeze(-1)).clamp(INT4_MIN, INT4_MAX).to(torch.int8)
    return pack_int4(q.view(n, k)), scale


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= each positive fp32 `x`: a scale rounded down would push the group's
    largest magnitude past the int4 range, and clamping it would cost more than half a step."""
    rounded = x.to(torch.bfloat16)
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    return torch.where(rounded.to(torch.float32) < x, up, rounded)
