"""The POSIX system calls behind :class:`~zarrckpt.storage._local.LocalStore`.

Gathered writes (``writev``) with writeback hints (``sync_file_range``),
scattered positional reads (``preadv``), ``syncfs``, ``renameat2`` and the
small-file helpers. Everything that touches a checkpoint file on a local
filesystem is in this module or in :mod:`zarrckpt.storage._local`.

Tests inject faults by replacing :func:`write_file`, :func:`write_json`,
:func:`_renameat2` and :func:`remove_tree` on this module: their callers look
them up here at call time (``_posix.write_file(...)``), never bind them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
from typing import Any

from ..format._json import dumps_json
from ..format._marker import COMMIT_MARKER

__all__ = [
    "COMMIT_MARKER",
    "WRITEBACK_MIN_BYTES",
    "fsync_path",
    "mkdir_fast",
    "preadv",
    "pwrite_all",
    "read_small",
    "remove_tree",
    "start_writeback",
    "sync_tree",
    "write_file",
    "write_json",
    "write_small",
]

#: at most this many buffers per ``writev``/``preadv`` call (IOV_MAX is 1024 on Linux)
_IOV_MAX = 512
#: with ``writeback=True`` the kernel is asked to start writing a file back after every
#: this many bytes, so that the disk works while the next bytes are being copied
_WRITEBACK_BYTES = 64 << 20
#: chunk files at least this large start their writeback while being written (fsync saves)
WRITEBACK_MIN_BYTES = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


_LIBC = _libc()


def _sync_file_range() -> Any:
    func = getattr(_LIBC, "sync_file_range", None) if _LIBC is not None else None
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _sync_file_range()


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """Call renameat2; return False when the system does not support it."""
    func = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if func is None:
        return False
    result = func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` back to disk (no wait).

    A hint only (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): durability still
    comes from fsync/syncfs; where the call is missing nothing happens.
    """
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def write_file(
    path: str, buffers: list[Any], *, fsync: bool = False, writeback: bool = False
) -> int:
    """Write ``buffers`` to a new file at ``path``; return the bytes written.

    With ``writeback`` the kernel starts writing the file to disk while it is
    being written (see :func:`start_writeback`), so that a later fsync/syncfs
    has little left to wait for.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    flushed = 0
    try:
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        while pending:
            batch = pending[:_IOV_MAX]
            written = os.writev(fd, batch)
            total += written
            if writeback and total - flushed >= _WRITEBACK_BYTES:
                start_writeback(fd, flushed, total - flushed)
                flushed = total
            # drop what was fully written, trim a partially written buffer
            while batch and written >= len(batch[0]):
                written -= len(batch[0])
                batch.pop(0)
                pending.pop(0)
            if written:
                pending[0] = pending[0][written:]
        if writeback:
            start_writeback(fd, flushed, total - flushed)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return total


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """``os.pwrite`` until every byte is written (one call writes at most ~2 GiB)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done : done + (1 << 30)], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes")
        done += n


def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
    """One ``preadv`` (at most :data:`_IOV_MAX` buffers, the caller's batches); may
    be short, 0 at end of file."""
    return os.preadv(fd, buffers, offset)


def mkdir_fast(path: str) -> None:
    """Create a directory (and missing parents); one syscall in the common case."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)


def write_small(path: str, data: bytes) -> None:
    """Write a small new file with three syscalls (no buffered-file machinery)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_small(path: str) -> bytes:
    """Whole content of a small file (open, fstat, read, close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(fd, os.fstat(fd).st_size + 1)]
        while parts[-1]:
            parts.append(os.read(fd, 1 << 16))
    finally:
        os.close(fd)
    return b"".join(parts)


def write_json(path: str, document: Any, *, fsync: bool = False) -> bytes:
    """Write ``document`` as UTF-8 JSON (durably if ``fsync``); return the bytes written."""
    data = dumps_json(document).encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return data


def fsync_path(path: str) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: str) -> None:
    """Make every file and directory below ``root`` durable.

    Uses one ``syncfs`` for the whole filesystem where available (one sync
    instead of thousands of ``fsync`` calls), else fsyncs each entry.
    """
    syncfs = getattr(_LIBC, "syncfs", None) if _LIBC is not None else None
    if syncfs is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def remove_tree(path: str) -> None:
    """Delete a file or directory tree, ignoring one that is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
