"""Host buffers as the native kernels want them, and their addresses for ctypes."""

import mmap
from typing import Any

import numpy as np


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def host_zeros(shape: tuple[int, ...], dtype: Any, huge_pages: bool = True) -> np.ndarray:
    """Zero-filled host memory starting on a cache line (numpy's own allocations start 16 bytes
    into one, so every 64-byte load of a kernel would straddle two lines). A large buffer is a
    private anonymous mapping, committed on first touch as with calloc; `huge_pages` advises
    transparent huge pages for it (the usual 'madvise' THP setting): a decode step streams
    every packed weight panel, and 4 KiB pages miss the TLB every few rows."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < (1 << 20):
        raw = np.zeros(nbytes + 64, np.uint8)
        start = -raw.ctypes.data % 64
        return raw[start:start + nbytes].view(dtype).reshape(shape)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buf, dtype, nbytes // dtype.itemsize).reshape(shape)  # keeps the mapping alive
