"""How the C allocator (glibc's malloc) treats the large blocks of CPU tensors.

By default glibc maps every block above its mmap threshold (at most 32 MB) on its own and
unmaps it when freed, so every large tensor a forward pass makes (a 128^3 window holds many of
64 MB and more) is page-faulted in afresh: on this project's 2-core machine the kernel's
time for those faults was a third of a window's (measured by benchmarks/bench_case.py).
retain_freed_memory() serves such blocks from the heap instead and keeps freed memory there
for the next tensor of the same size.

A freed block comes back for a tensor of its size only if it merges with the small pieces
cut off around it (torch asks for 64-byte aligned blocks: glibc cuts the alignment's slack
off both ends). glibc's per-thread cache (tcache) and its fast bins hold such pieces without
merging them; then every such tensor takes fresh memory from the top of the heap, which
faults in again and grows the peak. retain_freed_memory() turns the fast bins off;
the tcache can only be turned off when a process starts (GLIBC_TUNABLES), which
restart_without_tcache() does for a script before it imports torch.
"""
import ctypes
import os
import platform
import sys

# mallopt's parameter numbers (glibc's malloc.h)
M_MXFAST = 1
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TCACHE_OFF = "glibc.malloc.tcache_count=0"


def retain_freed_memory(keep_bytes=2 ** 30):
    """Serve large blocks from the heap (no mmap per block), merge freed pieces at once (no
    fast bins), and return freed memory at the top of the heap to the system only beyond
    keep_bytes. Process-wide, for the rest of the process. True when set; False where the C
    library has no glibc mallopt (macOS, Windows), which leaves the allocator as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows takes no CDLL(None)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) for param, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, keep_bytes), (M_MXFAST, 0)))


def restart_without_tcache():
    """Run this process's command again, at once, with glibc's tcache off (GLIBC_TUNABLES
    gains TCACHE_OFF; the tunables are read only at a process's start). Returns without
    restarting where it is off already or the C library is not glibc. Call it first in a
    script, before torch is imported: the restart costs the interpreter's start only."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if TCACHE_OFF in tunables.split(":") or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TCACHE_OFF}" if tunables else TCACHE_OFF
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
