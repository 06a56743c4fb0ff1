"""The packed layout against compressed-tensors' own packer, and the kernel's in-register unpack against both."""

from __future__ import annotations

import pytest
import torch
from k2ray.kernels import dequantize_int4, pack_int4, quantize_int4, unpack_int4, w4a16_gemm

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def _random_q(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (rows, cols), generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("shape", [(1, 8), (3, 64), (17, 96)])
def test_pack_matches_compressed_tensors(shape: tuple[int, int]) -> None:
    q = _random_q(*shape, seed=sum(shape))
    ours = pack_int4(q)
    assert torch.equal(ours, ct_helpers.pack_to_int32(q, 4))
    assert torch.equal(ct_helpers.unpack_from_int32(ours, 4, q.shape), q)
    assert torch.equal(unpack_int4(ours), q)


def test_stacked_expert_pack_matches_compressed_tensors() -> None:
    q = torch.stack([_random_q(6, 32, seed=e) for e in range(3)])
    assert torch.equal(torch.stack([pack_int4(q[e]) for e in range(3)]), ct_helpers.pack_to_int32(q, 4))


def test_nibble_order_is_lsb_first() -> None:
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, 7]], dtype=torch.int8)  # stored nibbles 0..6, 15
    assert pack_int4(q).item() == int("F6543210", 16) - (1 << 32)


def test_kernel_unpack_matches_compressed_tensors(kernel_device: torch.device) -> None:
    # x = I turns the GEMM into dequant(W)^T: the kernel's register unpack against the library's unpack.
    rows, cols = 40, 96
    packed, scale = quantize_int4(torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)))
    q = ct_helpers.unpack_from_int32(packed, 4, (rows, cols))
    expected = q.float().view(rows, -1, 32) * scale.float().unsqueeze(-1)
    eye = torch.eye(cols, dtype=torch.float32, device=kernel_device)
    got = w4a16_gemm(eye, packed.to(kernel_device), scale.to(kernel_device)).t().cpu()
    # Weights are rounded to the activation dtype before the dot, as on GPU, so compare at fp32 exactly.
    torch.testing.assert_close(got, expected.view(rows, cols), rtol=0, atol=0)
    assert torch.equal(dequantize_int4(packed, scale, dtype=torch.float32), expected.view(rows, cols))


@pytest.mark.parametrize(
    ("dtype", "magic", "bias"), [(torch.bfloat16, 0x4300, 136.0), (torch.float16, 0x6400, 1032.0)]
)
def test_bit_pattern_dequant_identity(dtype: torch.dtype, magic: int, bias: float) -> None:
    # The GPU kernels' FAST_DEQUANT: (magic | nibble) read as a 16-bit float is exactly bias - 8 + nibble.
    nibbles = torch.arange(16, dtype=torch.int16)
    values = (nibbles | magic).view(dtype) - bias
    assert torch.equal(values.float(), nibbles.float() - 8)
