from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MallocTuning:
    """glibc malloc settings for a tensor engine's host memory.

    By default glibc serves every block over 128 KiB (a threshold it then raises only slowly) with a fresh
    mmap and gives it back with munmap on free, so each step's activations, some MiB each, are page-faulted
    and zeroed by the kernel again on every step: a quarter of a CPU step's time went to system time. Kept on
    the heap and never trimmed below `trim_threshold_bytes`, the same pages are reused, as tcmalloc (which
    vLLM preloads on CPU) does. `mmap_threshold_bytes` is capped by glibc at 32 MiB on 64-bit hosts.
    """

    mmap_threshold_bytes: int = 32 * MIB
    trim_threshold_bytes: int = 1024 * MIB
    top_pad_bytes: int = 256 * MIB


def tune_host_allocator(tuning: MallocTuning) -> bool:
    """Apply `tuning` to this process's malloc; False (and nothing changed) where libc is not glibc."""
    libc = ctypes.CDLL(None)  # the process's own symbols: no library search (find_library runs ldconfig)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, tuning.mmap_threshold_bytes), (M_TRIM_THRESHOLD, tuning.trim_threshold_bytes),
                (M_TOP_PAD, tuning.top_pad_bytes))
    applied = all(mallopt(param, value) == 1 for param, value in settings)  # mallopt returns 1 on success
    if not applied:
        logger.warning("glibc rejected a malloc setting of %s; host allocations keep some defaults", tuning)
    return applied
