import subprocess
import sys
import textwrap

import pytest

from k2ray.engine.host_allocator import MIB, MallocTuning

# In a child: the tuning is process-wide. mallinfo2().hblks counts blocks glibc serves with their own mmap.
PROBE = textwrap.dedent("""
    import ctypes, sys
    from k2ray.engine.host_allocator import MallocTuning, tune_host_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    if sys.argv[1] == "tuned":
        assert tune_host_allocator(MallocTuning())
    before = libc.mallinfo2().hblks
    block = libc.malloc(int(sys.argv[2]))
    print(libc.mallinfo2().hblks - before)
    libc.free(block)
""")


def _mmapped_blocks(mode: str, num_bytes: int) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode, str(num_bytes)], capture_output=True, text=True,
                            timeout=60, check=True)
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_keeps_step_sized_blocks_on_the_heap():
    step_sized = 8 * MIB  # a prefill step's activation, over glibc's 128 KiB default threshold
    assert _mmapped_blocks("default", step_sized) == 1
    assert _mmapped_blocks("tuned", step_sized) == 0
    assert _mmapped_blocks("tuned", MallocTuning().mmap_threshold_bytes + MIB) == 1  # still mmapped above it
