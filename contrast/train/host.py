"""Host memory for training on the CPU: keep freed blocks for the next step instead of returning them to the system.

glibc's malloc serves large blocks (above a threshold of at most 32 MiB) with fresh mmap'd pages and unmaps them on
free, so every training step on the CPU pays page faults to re-zero its activations again (with batch 1024 of a
small ViT, close to half the step's CPU time went to the kernel). With mmap off and a high trim threshold the heap
keeps its high-water mark and a step reuses the previous step's pages, as jemalloc or tcmalloc would (glibc still
hands a block back now and then). The peak resident memory barely changes; memory freed after the peak stays with
the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the heap; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
