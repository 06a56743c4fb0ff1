from __future__ import annotations

import pytest
import torch
from k2ray.kernels import quantize_int4, w4a16_gemm, w4a16_gemm_ref

SPLIT_K_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 8, "USE_DOT": True}
ONE_GROUP_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 8, "USE_DOT": True}
GEMV_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 8, "USE_DOT": False}


def _problem(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    packed, scale = quantize_int4(torch.randn(n, k, generator=gen) / k**0.5)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x.to(device), packed.to(device), scale.to(device)


def assert_close_to_ref(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-2) -> None:
    # Weights are rounded to the activation dtype inside the kernel; the reference dequantizes in fp32.
    bound = rel * ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(got.float().cpu(), ref.float().cpu(), rtol=rel, atol=bound)


@pytest.mark.parametrize("config", [SPLIT_K_CONFIG, ONE_GROUP_CONFIG], ids=["splitk2", "bk32"])
@pytest.mark.parametrize(
    "mnk", [(1, 48, 96), (7, 40, 160), (33, 64, 256)], ids=lambda s: "x".join(map(str, s))
)
def test_matches_ref(mnk: tuple[int, int, int], config: dict, kernel_device: torch.device) -> None:
    x, packed, scale = _problem(*mnk, torch.bfloat16, kernel_device)
    got = w4a16_gemm(x, packed, scale, config=config)
    assert got.shape == (mnk[0], mnk[1]) and got.dtype == torch.bfloat16
    assert_close_to_ref(got, w4a16_gemm_ref(x, packed, scale))


@pytest.mark.parametrize("nk", [(48, 96), (40, 160), (64, 256)], ids=lambda s: "x".join(map(str, s)))
def test_gemv_path_for_one_row(nk: tuple[int, int], kernel_device: torch.device) -> None:
    x, packed, scale = _problem(1, *nk, torch.bfloat16, kernel_device, seed=3)
    assert_close_to_ref(w4a16_gemm(x, packed, scale, config=GEMV_CONFIG), w4a16_gemm_ref(x, packed, scale))
    with pytest.raises(AssertionError):
        w4a16_gemm(torch.cat([x, x]), packed, scale, config=GEMV_CONFIG)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes(dtype: torch.dtype, kernel_device: torch.device) -> None:
    x, packed, scale = _problem(3, 32, 64, dtype, kernel_device, seed=1)
    got = w4a16_gemm(x, packed, scale)
    assert got.dtype == dtype
    assert_close_to_ref(got, w4a16_gemm_ref(x, packed, scale))


def test_larger_group_and_strided_rows(kernel_device: torch.device) -> None:
    gen = torch.Generator().manual_seed(2)
    packed, scale = quantize_int4(torch.randn(24, 128, generator=gen), group_size=64)
    wide = torch.randn(5, 200, generator=gen).to(torch.bfloat16)
    x = wide[:, :128]  # row stride 200: a column slice of a bigger activation
    got = w4a16_gemm(x.to(kernel_device), packed.to(kernel_device), scale.to(kernel_device), group_size=64)
    assert_close_to_ref(got, w4a16_gemm_ref(x, packed, scale, group_size=64))


def test_rejects_bad_layouts(kernel_device: torch.device) -> None:
    x, packed, scale = _problem(2, 16, 64, torch.bfloat16, kernel_device)
    with pytest.raises(AssertionError):
        w4a16_gemm(x.to(torch.int32), packed, scale)
    with pytest.raises(AssertionError):
        w4a16_gemm(x, packed.t().contiguous().t(), scale)
    with pytest.raises(AssertionError):
        w4a16_gemm(x[:, :32], packed, scale)
    with pytest.raises(AssertionError):
        w4a16_gemm(x, packed, scale, group_size=24)
