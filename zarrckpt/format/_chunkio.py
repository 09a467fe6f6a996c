"""Compatibility names for the interop layer (issue 12, phase 2).

The chunk codec is :mod:`zarrckpt.format._codec` (pure) and
:mod:`zarrckpt.format._chunk_reader` (reads through a store); chunk files are
written by :meth:`zarrckpt.storage.Staging.write_chunk`. The converters and
``inspect/_checkpoint.py`` still import the old names from here, so this
module keeps them, built on the storage interface. It is the one module of the
format layer that imports the storage layer (an ``ignore_imports`` entry of
the layers contract in pyproject.toml), until those callers are rewired.
"""

from __future__ import annotations

from typing import Any

from ..storage import _posix
from ..storage._local import LocalStore
from ._chunk_reader import ChunkReader as _ChunkReader
from ._codec import EMPTY, crc32c, encode_chunk
from ._layout import ArrayLayout

__all__ = ["encode_chunk", "write_file", "ChunkReader", "crc32c", "start_writeback", "EMPTY"]


def write_file(
    path: str, buffers: list[Any], *, fsync: bool = False, writeback: bool = False
) -> int:
    """:func:`zarrckpt.storage._posix.write_file` (looked up at call time)."""
    return _posix.write_file(path, buffers, fsync=fsync, writeback=writeback)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """:func:`zarrckpt.storage._posix.start_writeback`."""
    _posix.start_writeback(fd, offset, nbytes)


class ChunkReader(_ChunkReader):
    """:class:`zarrckpt.format._chunk_reader.ChunkReader` of the array directory
    ``array_dir`` on the local filesystem."""

    def __init__(self, array_dir: str, layout: ArrayLayout, what: str) -> None:
        parent, _, name = array_dir.rpartition("/")
        super().__init__(LocalStore(parent), name, layout, what)
