"""`k2ray.kernels` without Triton (refs only), and the benchmark's no-GPU exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

NO_TRITON_SCRIPT = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
sys.modules["triton.language"] = None
import torch
import k2ray.kernels as k
assert not k.HAS_TRITON
packed, scale = k.quantize_int4(torch.randn(8, 64))
assert k.w4a16_gemm_ref(torch.randn(2, 64), packed, scale).shape == (2, 8)
try:
    k.w4a16_gemm(torch.randn(2, 64), packed, scale)
except RuntimeError as e:
    assert "Triton is not installed" in str(e)
else:
    raise AssertionError("launcher ran without Triton")
print("ok")
"""


def test_references_import_without_triton() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", NO_TRITON_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the full benchmark")
def test_bench_without_gpu_says_so_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    from k2ray.kernels.bench.bench_kernels import main

    assert main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
