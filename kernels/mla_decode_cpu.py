"""Paged MLA decode attention on CPU in C, reading the latent cache in place (mla_decode_cpu.c).

Same contract as mla_decode_attention_ref (mla_decode.py): q_latent [B, H, Lkv], q_pe [B, H, R], kv_cache
[num_blocks, block_size, Lkv + R], block_tables [B, max_num_blocks], seq_lens [B] (each >= 1) -> out [B, H, Lkv].

The torch kernels gather every sequence's rows into a workspace before their matmuls, and that copy was half
of decode attention's time; this one walks each sequence's blocks where they lie, once, with an online
softmax, on `torch.get_num_threads()` threads of torch's own OpenMP pool. Its library is compiled for the host
by the system C compiler the first time a process needs it (a fraction of a second: plain C, no torch headers)
and never written anywhere that outlives the process. Where there is no compiler, or for other dtypes or
devices, the call runs mla_decode_attention_grouped instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .mla_decode import check_mla_args
from .mla_decode_grouped import mla_decode_attention_grouped

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mla_decode_cpu.c")
COMPILERS = ("cc", "gcc", "clang")
# -ffast-math: vectorised dot-product reductions and glibc's vector expf (libmvec); the kernel never
# produces an infinity, so finite math holds. Without libmvec (not glibc) the link retries without it.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC")
VECTOR_MATH_FLAGS = ("-lmvec",)
BUILD_TIMEOUT_S = 120
# Per-thread scratch on the stack: num_heads * (block_size + 2) floats at most.
MAX_SCRATCH_FLOATS = 1 << 16
PROCESS_MAPS = Path("/proc/self/maps")

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = (_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _I64)


def torch_openmp_runtime() -> str | None:
    """The GNU OpenMP library torch loaded into this process (Linux), or None."""
    if not PROCESS_MAPS.exists():
        return None
    paths = {line.split()[-1] for line in PROCESS_MAPS.read_text().splitlines() if "libgomp" in line}
    return min(paths) if len(paths) == 1 else None


def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("building the CPU MLA decode kernel failed: %s", exc)
        return None


def _build(compiler: str, tmp: Path) -> Path | None:
    """Compile, then link against torch's own libgomp by path, so the kernel's threads are torch's pool (no
    second OpenMP runtime in the process); without one it builds single-threaded."""
    runtime = torch_openmp_runtime()
    obj, library = tmp / "mla_decode_cpu.o", tmp / "mla_decode_cpu.so"
    openmp = ("-fopenmp",) if runtime is not None else ()
    result = _run([compiler, *COMPILE_FLAGS, *openmp, "-c", str(SOURCE), "-o", str(obj)])
    if result is None or result.returncode != 0:
        logger.warning("compiling the CPU MLA decode kernel failed: %s", result and result.stderr.strip()[-500:])
        return None
    link = [compiler, "-shared", str(obj), "-o", str(library), *((runtime,) if runtime else ())]
    for extra in (VECTOR_MATH_FLAGS, ()):
        result = _run([*link, *extra])
        if result is not None and result.returncode == 0:
            return library
    logger.warning("linking the CPU MLA decode kernel failed: %s", result and result.stderr.strip()[-500:])
    return None


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The kernel built for this host (once per process), or None where no C compiler builds it."""
    compiler = next((path for name in COMPILERS if (path := shutil.which(name))), None)
    if compiler is None:
        logger.warning("no C compiler found: CPU decode attention runs the torch kernel (mla_decode_grouped)")
        return None
    with tempfile.TemporaryDirectory(prefix="k2ray-mla-") as tmp:
        path = _build(compiler, Path(tmp))
        if path is None:
            return None
        library = ctypes.CDLL(str(path))  # stays mapped after the directory is gone
    library.mla_decode_paged.argtypes = _ARGTYPES
    library.mla_decode_paged.restype = None
    return library


def runs_native(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether these tensors take the C kernel (else the grouped torch kernel)."""
    num_heads, block_size = q_latent.shape[1], kv_cache.shape[1]
    return (kv_cache.device.type == "cpu" and kv_cache.dtype == torch.float32
            and num_heads * (block_size + 2) <= MAX_SCRATCH_FLOATS and native_library() is not None)


def _check_bounds(tables: torch.Tensor, lens: torch.Tensor, num_blocks: int, block_size: int) -> None:
    if tables.numel() and not 0 <= int(tables.min()) <= int(tables.max()) < num_blocks:
        raise IndexError(f"block_tables hold block ids outside [0, {num_blocks})")
    if lens.numel() and not 1 <= int(lens.min()) <= int(lens.max()) <= tables.shape[1] * block_size:
        raise IndexError(f"seq_lens must be in [1, {tables.shape[1] * block_size}] for these block tables")


def mla_decode_attention_cpu(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """mla_decode_attention_ref on the C kernel where it runs (fp32 on CPU), else the grouped torch kernel."""
    check_mla_args(q_latent, q_pe, kv_cache, block_tables, seq_lens)
    if not runs_native(q_latent, q_pe, kv_cache):
        return mla_decode_attention_grouped(q_latent, q_pe, kv_cache, block_tables, seq_lens, softmax_scale,
                                            max_seq_len=max_seq_len)
    batch, num_heads, kv_lora = q_latent.shape
    q = torch.cat([q_latent, q_pe], dim=-1)  # [B, H, Lkv + R], contiguous
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    _check_bounds(tables, lens, kv_cache.shape[0], kv_cache.shape[1])  # C reads where these point, unchecked
    out = torch.empty(batch, num_heads, kv_lora, dtype=torch.float32)
    native_library().mla_decode_paged(
        q.data_ptr(), kv_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(), batch, num_heads,
        kv_lora, q_pe.shape[-1], kv_cache.shape[1], tables.shape[1], softmax_scale, torch.get_num_threads())
    return out
