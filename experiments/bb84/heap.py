"""Give the heap's free memory back to the operating system after each key block.

A key block's post-processing allocates and frees a few hundred MB of arrays in the
worker thread.  glibc keeps freed heap memory mapped for reuse (its mmap threshold
grows after large frees, and a worker thread has its own arena), so the process's
resident memory would creep up with fragmentation over a long run even though nothing
is held: ``malloc_trim(0)`` returns every whole free page of every arena.  It costs a few
milliseconds once per block (about every ten seconds at 25 km).  On other C libraries
(macOS, Windows, musl) there is nothing to call and memory is left to the allocator.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS; ``False`` where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
