"""Process-wide settings for CPU speed, applied by the command line (``gnnst <command>``).

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB at start, raised only as
blocks are freed) with a fresh ``mmap`` and returns it with ``munmap``. The encoder's activation maps
(~10 MB each at batch 6) then cost a page fault per 4 KiB page on every forward pass: measured on the
2-core CPU, 4.8 M minor faults and 7.9 s of system time for 864 patches, 150 patches/s. Keeping blocks
up to 64 MiB in the heap (and up to 256 MiB of free heap before trimming it) gave 0.35 M faults, 0.8 s
of system time and 240 patches/s, with the same embeddings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # bytes
TRIM_THRESHOLD = 256 << 20  # bytes


_applied: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); once per process.

    Does nothing (returns False) on another C library, or when the user set them through
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
