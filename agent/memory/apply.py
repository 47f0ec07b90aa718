"""Applying a plan once the model is loaded: drop the cold file pages, advise the kernel which ranges are hot, and
give freed C heap back to the kernel after a projector is released."""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
from pathlib import Path
from typing import Any

from agent.memory.estimate import PAGE, Estimate
from agent.memory.probe import MiB

__all__ = ["MiB", "advise", "release_cold_pages", "return_freed_heap"]
log = logging.getLogger("agent.memory")


def mapped_ranges(path: str | os.PathLike[str], maps: str = "/proc/self/maps") -> list[tuple[int, int, int]]:
    """(start address, end address, file offset) of every mapping of `path` in this process."""
    st = os.stat(path)
    out = []
    for line in Path(maps).read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        dev, inode = parts[3], parts[4]
        major, minor = (int(x, 16) for x in dev.split(":"))
        if int(inode) != st.st_ino or os.makedev(major, minor) != st.st_dev:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, int(parts[2], 16)))
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def advise(path: str | os.PathLike[str], ranges: list[tuple[int, int]], advice: int) -> int:
    """madvise() the pages of file byte ranges wherever this process maps `path`; returns the bytes advised.
    Ranges are shrunk to whole pages, so a page shared with a neighbouring tensor is left alone."""
    done = 0
    for lo, hi, offset in mapped_ranges(path):
        for start, end in ranges:
            a = max(start, offset)
            b = min(end, offset + (hi - lo))
            a = -(-a // PAGE) * PAGE
            b = b // PAGE * PAGE
            if b <= a:
                continue
            if _libc.madvise(lo + a - offset, b - a, advice) != 0:
                err = ctypes.get_errno()
                log.warning("madvise(%d) on %s failed: %s", advice, path, os.strerror(err))
                continue
            done += b - a
    return done


def release_cold_pages(path: str | os.PathLike[str], est: Estimate) -> int:
    """Drop the cold pages (per-layer-embedding table, file copy of repacked weights) from this process and from
    the page cache, mark the table random-access (no read-ahead when a row comes back), and ask the kernel to
    read the hot pages back ahead of the first token. Returns the bytes dropped."""
    dropped = advise(path, est.cold_ranges, mmap.MADV_DONTNEED)
    advise(path, est.cold_ranges, mmap.MADV_RANDOM)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.warning("cannot reopen %s to drop its cold pages: %s", path, exc)
        return dropped
    try:
        for start, end in est.cold_ranges:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    advise(path, est.hot_ranges, mmap.MADV_WILLNEED)
    return dropped


@functools.cache
def _malloc_trim() -> Any:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_heap() -> bool:
    """Give memory freed inside the C heap back to the kernel (glibc malloc_trim); False where there is none.

    Without it a projector freed and loaded again leaves ~20 MiB more anonymous memory per cycle on the tiny test
    projector: glibc raises its mmap threshold after the first free, so the second load lands in the heap."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
