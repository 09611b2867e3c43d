"""Host memory that a CPU run gives back.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
tensors of that size come from the heap and stay in the process when freed: a ZeRO-3 rank that gathers a
layer, uses it and frees it keeps the pages, and its resident memory climbs towards the whole model over a
few steps although it never holds it. On a CPU run the host is the device, so ``return_freed_memory`` fixes
the thresholds (``mallopt``): blocks of 128 KiB and more are mapped and unmapped, and the heap is trimmed.
A no-op where glibc is not the allocator (or ``MALLOC_MMAP_THRESHOLD_`` is set by the user).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
THRESHOLD = 128 * 1024


def return_freed_memory() -> bool:
    """Fix glibc's mmap/trim thresholds for this process; whether it was done."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    if not ok:
        logger.debug("mallopt refused the thresholds; freed tensor memory may stay in the process")
    return ok


__all__ = ["return_freed_memory"]
