"""Freed heap memory goes back to the OS after a key block (glibc's malloc_trim)."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest

from qkdlab.experiments.bb84.heap import release_free_heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@glibc
def test_free_heap_pages_are_returned_to_the_os() -> None:
    # a large free raises glibc's mmap threshold: later 1 MiB buffers live on the heap,
    # as a key block's arrays do after the first block
    big = np.ones(16 * MiB, np.uint8)  # under glibc's 32 MiB ceiling for that
    del big
    chunks = [np.ones(MiB, np.uint8) for _ in range(200)]  # written: resident
    pin = chunks[-1]  # the top of the heap stays in use, so free() cannot shrink it
    del chunks
    held = rss_bytes()
    assert release_free_heap()
    released = held - rss_bytes()
    assert released > 150 * MiB, f"only {released / MiB:.0f} MiB returned"
    assert pin.size == MiB
