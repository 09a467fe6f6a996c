"""Positional reads of local files (:class:`LocalRangeReader`) and the held-open
checkpoint directory (:class:`_DirHandle`) of :class:`~zarrckpt.storage._local.LocalStore`.

System calls go through :mod:`zarrckpt.storage._posix`, looked up at call time
so that tests can inject faults there.
"""

from __future__ import annotations

import contextlib
import os

from . import _posix
from ._base import RangeReader

__all__ = ["LocalRangeReader"]


class LocalRangeReader(RangeReader):
    """A file open for ``preadv`` (takes ownership of the descriptor)."""

    def __init__(self, fd: int, size: int | None = None) -> None:
        self._fd: int | None = fd
        self._size = size

    @property
    def size(self) -> int:
        if self._size is None:
            if self._fd is None:
                raise ValueError("size of a closed reader")
            self._size = os.fstat(self._fd).st_size
        return self._size

    def readv_into(self, buffers: list[memoryview], offset: int) -> int:
        if self._fd is None:
            raise ValueError("read from a closed reader")
        return _posix.preadv(self._fd, buffers, offset)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class _DirHandle:
    """An open checkpoint directory, closed when the last store holding it goes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
