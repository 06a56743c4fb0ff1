"""Merge two partial attention results over disjoint key sets by their log-sum-exp.

Attention of the same queries over keys K1 and over keys K2 (outputs o1, o2, natural-log LSEs l1, l2) combines
into attention over K1 + K2 without seeing the keys again:
    m = max(l1, l2);  w1 = exp(l1 - m), w2 = exp(l2 - m)
    out = (w1 * o1 + w2 * o2) / (w1 + w2);  lse = m + log(w1 + w2)
    out_a / out_b [H, T, D] (rows contiguous), lse_a / lse_b [H, T] float32 -> out [H, T, D] in out_a's dtype,
    lse [H, T] float32
An empty part (lse = -inf) contributes nothing; two empty parts give out 0, lse -inf. Used by chunked prefill
over the latent cache: each context chunk's partial result is folded into the running one.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton

MERGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def merge_attention_states_kernel(
    out_ptr, out_lse_ptr, a_ptr, a_lse_ptr, b_ptr, b_lse_ptr,
    stride_oh, stride_ot, stride_ah, stride_at, stride_bh, stride_bt, stride_olh, stride_alh, stride_blh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    t = tl.program_id(1)
    lse_a = tl.load(a_lse_ptr + h * stride_alh + t)
    lse_b = tl.load(b_lse_ptr + h * stride_blh + t)
    is_empty = tl.maximum(lse_a, lse_b) == float("-inf")
    # Both empty: any finite shift keeps exp() at 0 instead of exp(-inf - -inf) = nan.
    m = tl.where(is_empty, 0.0, tl.maximum(lse_a, lse_b))
    w_a = tl.exp(lse_a - m)
    w_b = tl.exp(lse_b - m)
    total = w_a + w_b
    inv_total = tl.where(is_empty, 0.0, 1.0 / tl.where(is_empty, 1.0, total))
    offs = tl.arange(0, BLOCK_D)
    mask = offs < HEAD_DIM
    a = tl.load(a_ptr + h * stride_ah + t * stride_at + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + h * stride_bh + t * stride_bt + offs, mask=mask).to(tl.float32)
    out = (a * (w_a * inv_total) + b * (w_b * inv_total)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + h * stride_oh + t * stride_ot + offs, out, mask=mask)
    lse = tl.where(is_empty, float("-inf"), m + tl.log(tl.where(is_empty, 1.0, total)))
    tl.store(out_lse_ptr + h * stride_olh + t, lse)


def _check_merge_args(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    assert out_a.dim() == 3 and out_a.shape == out_b.shape, "want out_a / out_b [H, T, D] of one shape"
    assert out_a.dtype in MERGE_DTYPES and out_b.dtype in MERGE_DTYPES, "outputs must be floating point"
    assert out_a.stride(2) == 1 and out_b.stride(2) == 1, "output rows must be contiguous"
    assert lse_a.shape == out_a.shape[:2] and lse_b.shape == out_a.shape[:2], "want lse_a / lse_b [H, T]"
    assert lse_a.dtype == torch.float32 and lse_b.dtype == torch.float32, "LSEs must be float32"
    assert lse_a.stride(1) == 1 and lse_b.stride(1) == 1, "LSE rows must be contiguous"
    assert out_a.device == out_b.device == lse_a.device == lse_b.device, "all on one device"


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of merge_attention_states_ref: one program per (head, token)."""
    require_triton()
    _check_merge_args(out_a, lse_a, out_b, lse_b)
    num_heads, num_tokens, head_dim = out_a.shape
    out = torch.empty_like(out_a, memory_format=torch.contiguous_format)
    lse = torch.empty(num_heads, num_tokens, dtype=torch.float32, device=out_a.device)
    if out.numel() == 0:
        return out, lse
    merge_attention_states_kernel[(num_heads, num_tokens)](
        out, lse, out_a, lse_a, out_b, lse_b,
        out.stride(0), out.stride(1), out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1),
        lse.stride(0), lse_a.stride(0), lse_b.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
    return out, lse


def merge_attention_states_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """out_a / out_b [H, T, D], lse_a / lse_b [H, T] float32 -> (out [H, T, D] in out_a's dtype, lse [H, T])."""
    m = torch.maximum(lse_a, lse_b)
    is_empty = m == float("-inf")
    m = torch.where(is_empty, torch.zeros_like(m), m)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    safe_total = torch.where(is_empty, torch.ones_like(total), total)
    out = (out_a.float() * (w_a / safe_total).unsqueeze(-1) + out_b.float() * (w_b / safe_total).unsqueeze(-1))
    lse = torch.where(is_empty, torch.full_like(m, float("-inf")), m + torch.log(safe_total))
    return out.to(out_a.dtype), lse
