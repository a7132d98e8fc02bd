"""Keep freed large buffers in the process instead of handing them back to the kernel.

Every push allocates and frees a few buffers the size of its tensors (the body, the response).
glibc serves allocations over its mmap threshold (128 KiB, raised only as such blocks are freed)
with fresh mmap()s and returns them with munmap(), and trims the top of its heaps once 128 KiB lie
free there, so the next push takes a page fault, and the kernel zeroes a page, for every 4 KiB it
touches again: a quarter of the server's CPU at 1e6 parameters, measured with perf
(clear_page_erms). Raising both thresholds lets malloc reuse the freed blocks. Tensors of over
MMAP_THRESHOLD still get their own mapping, so a very large session's memory goes back when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): buffers below it are reused
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free memory kept at the top of a heap before it is given back
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc (no-op elsewhere); True when it took both settings."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    took = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    took = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and took
    if not took:
        log.info("malloc tuning not applied: freed buffers go back to the kernel")
    return took
