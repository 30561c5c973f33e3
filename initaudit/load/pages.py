"""Handing back the memory of a tensor read from a memory-mapped file once it has been audited.

A file mapped into memory (`torch.load(mmap=True)`, safetensors) keeps every page a tensor was read
from in the process's resident set, so auditing a 40 GB checkpoint would hold 40 GB. `MappedFile`
finds where the file is mapped (Linux: /proc/self/maps, matched by the file's device and inode) and
`release` drops a tensor's pages there with madvise(MADV_DONTNEED): they stay in the page cache and
come back unchanged if read again. Only ranges of that file's own mappings are ever released (never
memory a tensor owns); elsewhere (not Linux, a copy in memory) `release` does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges [start, end) where this process maps `path` (empty where /proc/self/maps is missing)."""
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or int(fields[4]) != st.st_ino:
            continue
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        if os.makedev(major, minor) == st.st_dev or os.path.realpath(fields[5].strip()) == os.path.realpath(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


class MappedFile:
    """Where one file is mapped into memory, to release tensors read from it."""

    def __init__(self, path: Path):
        self.ranges = mapped_ranges(path) if _MADVISE is not None else []

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages of `tensor`'s storage, where they lie in a mapping of this file."""
        if not self.ranges:
            return
        try:
            storage = tensor.untyped_storage()
            start, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse, quantized...: not a plain view of the file
            return
        self.release_range(start, start + size)

    def release_range(self, start: int, end: int) -> None:
        for lo, hi in self.ranges:
            a, b = max(start, lo), min(end, hi)
            if a >= b:
                continue
            a -= a % _PAGE
            b = min(hi, b + (-b) % _PAGE)
            _MADVISE(a, b - a, _MADV_DONTNEED)

    def release_all(self) -> None:
        for lo, hi in self.ranges:
            _MADVISE(lo, hi - lo, _MADV_DONTNEED)
