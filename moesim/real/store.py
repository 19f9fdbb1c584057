"""Expert weights on disk, read with the page cache bypassed, into aligned host buffers.

The file holds every (layer, expert) of the model: expert `key = layer * E + e` at offset
`key * slot_bytes` (slot_bytes: the expert's bytes padded to 4096). Its contents are random
weights of the model's shape (a few distinct random experts repeated: the values do not matter
for timing, only that they are finite numbers).

Bypass methods, picked by `open_reader(method="auto")`:

* ``odirect``: ``O_DIRECT`` reads into page-aligned buffers (offsets and sizes are 4096-aligned);
  the page cache is never filled.
* ``fadvise``: buffered reads, with ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the range before
  each read (and ``POSIX_FADV_RANDOM`` on the file, so readahead pulls in nothing extra).
* ``buffered``: plain reads through the page cache (no bypass; for comparison only).

`cached_fraction()` asks the kernel (``mincore``) how much of a range is in the page cache, so a
bypass can be verified rather than assumed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

from ..errors import InputError
from .kernels import ALIGN

METHODS = ("auto", "odirect", "fadvise", "buffered")


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zero-filled, page-aligned, already-faulted-in uint8 array (anonymous mmap)."""
    n = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
    mm = mmap.mmap(-1, n)
    arr = np.frombuffer(mm, dtype=np.uint8)
    arr[::ALIGN] = 0  # touch every page now, not during a timed read
    return arr


def drop_cache(path, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop a file range from the page cache (clean pages only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return _libc


def cached_fraction(path, offset: int, length: int) -> float | None:
    """Fraction of the pages of [offset, offset+length) that are in the page cache (mincore);
    None where that cannot be asked (not Linux, or the call fails)."""
    try:
        libc = _lib()
        page = mmap.PAGESIZE
        start = offset - offset % page
        n = offset + length - start
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = -(-n // page)
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, n, vec) != 0:
                    return None
                return sum(b & 1 for b in vec) / pages
            finally:
                libc.munmap(addr, n)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


class Reader:
    """Reads `length` bytes at `offset` of one file into a buffer, bypassing the page cache."""

    def __init__(self, path, method: str):
        self.path, self.method = str(path), method
        flags = os.O_RDONLY | (os.O_DIRECT if method == "odirect" else 0)
        self.fd = os.open(self.path, flags)
        if method == "fadvise":
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read(self, buf, offset: int, length: int) -> None:
        """Fill memoryview/array `buf[:length]` from `offset` (all three 4096-aligned for odirect)."""
        if self.method == "fadvise":
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        mv = memoryview(buf).cast("B")[:length]
        got = 0
        while got < length:
            n = os.preadv(self.fd, [mv[got:]], offset + got)
            if n <= 0:
                raise OSError(f"short read of {self.path} at {offset + got}")
            got += n
        if self.method == "fadvise":
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_reader(path, method: str = "auto") -> Reader:
    """A Reader; `auto` tries O_DIRECT with an aligned test read, then falls back to fadvise."""
    if method not in METHODS:
        raise InputError(f"expected one of {', '.join(METHODS)}, got {method!r}", field="--io")
    if method in ("auto", "odirect"):
        try:
            r = Reader(path, "odirect")
            r.read(aligned_buffer(ALIGN), 0, ALIGN)
            return r
        except OSError as e:
            if method == "odirect":
                raise InputError(f"O_DIRECT reads fail on this filesystem ({e}); use --io fadvise",
                                 file=str(path)) from None
    return Reader(path, "fadvise" if method == "auto" else method)


def write_random_file(path, n_blocks: int, block_bytes: int, fill, chunk_bytes: int = 64 << 20) -> None:
    """Write `n_blocks` blocks of `block_bytes`; block i holds `fill(i)` (a uint8 array of at most
    block_bytes). fsync'd and dropped from the page cache afterwards."""
    blocks_per_chunk = max(1, chunk_bytes // block_bytes)
    buf = np.zeros(blocks_per_chunk * block_bytes, dtype=np.uint8)
    with open(path, "wb") as f:
        i = 0
        while i < n_blocks:
            m = min(blocks_per_chunk, n_blocks - i)
            for j in range(m):
                data = fill(i + j)
                buf[j * block_bytes: j * block_bytes + len(data)] = data
            f.write(memoryview(buf)[: m * block_bytes])
            i += m
        f.flush()
        os.fsync(f.fileno())
    drop_cache(path)
