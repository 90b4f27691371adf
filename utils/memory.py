"""How the C allocator (glibc's malloc) treats the large blocks of CPU tensors.

By default glibc maps every block above its mmap threshold (at most 32 MB) on its own and
unmaps it when freed, so every large tensor a forward pass makes (a 128^3 window holds many of
64 MB and more) is page-faulted in afresh: on this project's 2-core machine the kernel's
time for those faults was a third of a window's (measured by benchmarks/bench_case.py).
retain_freed_memory() serves such blocks from the heap instead and keeps freed memory there
for the next tensor of the same size.
"""
import ctypes

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def retain_freed_memory(keep_bytes=2 ** 30):
    """Serve large blocks from the heap (no mmap per block) and return freed memory at the top
    of the heap to the system only beyond keep_bytes. Process-wide, for the rest of the
    process. True when set; False where the C library has no glibc mallopt (macOS, Windows),
    which leaves the allocator as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows takes no CDLL(None)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, keep_bytes))
