"""Measurement helpers: page cache control, peak RSS, checksums, file trees."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import crc32c
import numpy as np
import torch

__all__ = [
    "files_under",
    "evict",
    "prewarm",
    "remove",
    "PeakRSS",
    "tensor_bytes",
    "checksums",
    "fsync_file",
    "empty_series",
]


def files_under(path: str) -> list[str]:
    """Regular files of a checkpoint (the file itself, or every file below a directory)."""
    if os.path.isfile(path):
        return [path]
    out: list[str] = []
    for dirpath, _dirs, names in os.walk(path):
        out.extend(os.path.join(dirpath, n) for n in names)
    return out


def fsync_file(path: str) -> None:
    """``os.fsync`` an existing file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(files: Iterable[str]) -> None:
    """Drop files from the page cache (cold reads): fdatasync, then POSIX_FADV_DONTNEED.

    Directory entries and inodes stay cached (dropping them would need
    ``/proc/sys/vm/drop_caches``, which affects every process on the machine).
    """
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_PREWARM = bytearray(16 << 20)


def prewarm(files: Iterable[str]) -> None:
    """Read files completely so that they sit in the page cache (warm reads)."""
    view = memoryview(_PREWARM)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.readv(fd, [view]) > 0:
                pass
        finally:
            os.close(fd)


def remove(path: str) -> None:
    """Delete a file or directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident set size of one operation in this process.

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``)
    before the operation and reads ``VmHWM`` after it; ``extra`` is the peak
    above the RSS at the start (what the operation itself added). RSS counts
    file pages mapped into the process (``mmap`` loads) as well as anonymous
    memory.
    """

    supported: bool = os.path.exists("/proc/self/clear_refs")

    def __init__(self) -> None:
        self.start_kb = 0
        self.peak_kb = 0

    def __enter__(self) -> PeakRSS:
        if self.supported:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                type(self).supported = False
        self.start_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_kb = _status_kb("VmHWM") if self.supported else _status_kb("VmRSS")

    @property
    def extra_kb(self) -> int:
        return max(0, self.peak_kb - self.start_kb)


def tensor_bytes(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """Flat uint8 view of a contiguous tensor or array (any dtype, 0-d included)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(t).reshape(-1).view(np.uint8)


def checksums(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, int]:
    """crc32c of every tensor's bytes."""
    return {k: int(crc32c.crc32c(tensor_bytes(v).data)) for k, v in tensors.items()}


def empty_series(system: str, op: str) -> dict[str, Any]:
    """The record of one (system, op) series, as every runner reports it."""
    return {
        "system": system,
        "op": op,
        "times_s": [],
        "warmup_s": [],
        "peak_rss_kb": [],
        "extra_rss_kb": [],
        "verified_loads": 0,
        "error": None,
        "metrics": {},
    }
