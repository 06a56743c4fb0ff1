"""Guarded Triton import: kernel modules import `triton`/`tl` from here so the torch references load where
Triton is missing. Without Triton the decorators leave the kernel bodies as plain (never called) functions and
`require_triton()` makes every launcher fail with a clear message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: only the *_ref functions are usable
    HAS_TRITON = False

    class _MissingTriton:
        @staticmethod
        def jit(fn: Callable | None = None, **_: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_: Any, **__: Any) -> Callable:
            return lambda f: f

        @staticmethod
        def heuristics(*_: Any, **__: Any) -> Callable:
            return lambda f: f

        @staticmethod
        def Config(kwargs: dict, **meta: Any) -> dict:  # noqa: N802 - mirrors triton.Config
            return {"kwargs": kwargs, **meta}

    class _MissingLanguage:
        constexpr = Any

    triton = _MissingTriton()
    tl = _MissingLanguage()


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the *_ref torch implementations")


def is_interpreter(device: torch.device) -> bool:
    """Non-CUDA tensors can only run under TRITON_INTERPRET=1, where the kernels compute in fp32 because the
    interpreter stores bf16 as raw uint16 and cannot multiply it."""
    return device.type != "cuda"


def tl_dtype(dtype: torch.dtype) -> Any:
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def compute_dtype(dtype: torch.dtype, device: torch.device) -> Any:
    """Tensor-core operand dtype: the activation dtype on GPU, fp32 under the interpreter."""
    return tl.float32 if is_interpreter(device) else tl_dtype(dtype)


def fast_dequant(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether INT4 tiles are dequantized by bit tricks in the 16-bit activation dtype (compiled kernels only)."""
    return not is_interpreter(device) and dtype in (torch.bfloat16, torch.float16)


def launch(kernel: Any, grid: Any, args: tuple, config: dict | None, **constexprs: Any) -> None:
    """Autotune on CUDA; a fixed `config` (dict of meta-parameters plus optional num_warps / num_stages)
    bypasses the tuner, which the interpreter always needs (it cannot benchmark)."""
    if config is None:
        kernel[grid](*args, **constexprs)
        return
    kernel.fn[grid](*args, **constexprs, **config)
