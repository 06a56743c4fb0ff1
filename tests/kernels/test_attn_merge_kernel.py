from __future__ import annotations

import pytest
import torch
from k2ray.kernels import merge_attention_states, merge_attention_states_ref


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.einsum("htd,hsd->hts", q, k)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("hts,hsd->htd", torch.softmax(scores, dim=-1), v), lse


def test_ref_merges_two_key_sets_into_attention_over_both() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 8, generator=gen) for n in (5, 11, 11))
    whole, whole_lse = _attend(q, k, v)
    out, lse = merge_attention_states_ref(*_attend(q, k[:, :4], v[:, :4]), *_attend(q, k[:, 4:], v[:, 4:]))
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)


def _problem(heads: int, tokens: int, dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # Outputs as [T, H, D] buffers seen as [H, T, D] (strided, as the model's transposes give them).
    out_a = torch.randn(tokens, heads, dim, generator=gen).to(dtype).transpose(0, 1)
    out_b = torch.randn(tokens, heads, dim, generator=gen).to(dtype).transpose(0, 1)
    lse_a = torch.randn(heads, tokens, generator=gen) * 4
    lse_b = torch.randn(heads, tokens, generator=gen) * 4
    lse_b[0, 0] = float("-inf")  # an empty part
    lse_a[-1, -1] = lse_b[-1, -1] = float("-inf")  # both empty
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize(
    ("heads", "tokens", "dim", "dtype"),
    [(4, 7, 16, torch.float32), (3, 5, 24, torch.bfloat16), (1, 1, 128, torch.float16)],
    ids=["fp32", "bf16_dim24", "one_row_fp16"],
)
def test_kernel_matches_ref(heads, tokens, dim, dtype, kernel_device: torch.device) -> None:
    args = _problem(heads, tokens, dim, dtype)
    ref_out, ref_lse = merge_attention_states_ref(*args)
    out, lse = merge_attention_states(*(t.to(kernel_device) for t in args))
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), ref_lse)
    assert lse[-1, -1].item() == float("-inf") and not out.isnan().any()


def test_kernel_keeps_an_fp32_accumulator_beside_a_bf16_part(kernel_device: torch.device) -> None:
    out_a, lse_a, out_b, lse_b = _problem(2, 3, 16, torch.bfloat16)
    args = (out_a.float(), lse_a, out_b, lse_b)
    out, _ = merge_attention_states(*(t.to(kernel_device) for t in args))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), merge_attention_states_ref(*args)[0], atol=1e-5, rtol=1e-5)


def test_rejects_bad_layouts(kernel_device: torch.device) -> None:
    out_a, lse_a, out_b, lse_b = (t.to(kernel_device) for t in _problem(2, 3, 16, torch.float32))
    with pytest.raises(AssertionError):
        merge_attention_states(out_a, lse_a.half(), out_b, lse_b)
    with pytest.raises(AssertionError):
        merge_attention_states(out_a, lse_a, out_b[:, :2], lse_b)
    with pytest.raises(AssertionError):
        merge_attention_states(out_a.transpose(1, 2).contiguous().transpose(1, 2), lse_a, out_b, lse_b)
