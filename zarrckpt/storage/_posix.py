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
import stat
import sys
from typing import Any

from ..format._json import dumps_json
from ..format._marker import COMMIT_MARKER

__all__ = [
    "COMMIT_MARKER",
    "WRITEBACK_MIN_BYTES",
    "UnsafeEntryError",
    "fsync_path",
    "mkdir_fast",
    "check_regular",
    "describe_mode",
    "open_beneath",
    "read_fd",
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


# ------------------------------------------------------------------ path safety

#: ``openat2`` (Linux >= 5.6) has the same number on x86_64 and aarch64
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2_available() -> bool:
    return (
        _LIBC is not None
        and sys.platform.startswith("linux")
        and os.uname().machine in ("x86_64", "aarch64")
        and hasattr(_LIBC, "syscall")
    )


#: whether :func:`open_beneath` tries ``openat2`` (cleared when the kernel lacks it;
#: tests clear it to exercise the per-component fallback)
USE_OPENAT2 = _openat2_available()


class UnsafeEntryError(OSError):
    """An entry below a checkpoint root that zarrckpt refuses to open: a symbolic
    link, a ``..`` or empty component, or something other than a regular file
    or directory (a device, a FIFO, a socket). ``filename`` is the key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(errno.ELOOP, reason, key)
        self.reason = reason


def _check_components(key: str) -> list[str]:
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafeEntryError(key, f"has a {part or 'empty'!r} path component")
    return parts


def _openat2(dir_fd: int, key: str, flags: int, mode: int) -> int | None:
    """``openat2(dir_fd, key, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``; None when the
    kernel lacks the call."""
    global USE_OPENAT2
    how = _OpenHow(
        flags | os.O_CLOEXEC,
        mode if flags & os.O_CREAT or (_O_TMPFILE and flags & _O_TMPFILE == _O_TMPFILE) else 0,
        _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
    )
    fd = _LIBC.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(key)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        USE_OPENAT2 = False
        return None
    if err in (errno.ELOOP, errno.EXDEV):
        raise UnsafeEntryError(key, "is or passes through a symbolic link")
    raise OSError(err, os.strerror(err), key)


def _open_walk(dir_fd: int, key: str, flags: int, mode: int) -> int:
    """The fallback of :func:`open_beneath`: one ``openat(O_NOFOLLOW)`` per component."""
    parts = key.split("/")
    fd = dir_fd
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise UnsafeEntryError(key, "passes through a symbolic link") from None
                raise
            if fd != dir_fd:
                os.close(fd)
            fd = nfd
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeEntryError(key, "is a symbolic link") from None
            if e.errno == errno.ENOTDIR and flags & os.O_DIRECTORY:
                st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafeEntryError(key, "is a symbolic link") from None
            raise
    finally:
        if fd != dir_fd:
            os.close(fd)


def open_beneath(dir_fd: int, key: str, flags: int, mode: int = 0o644) -> int:
    """Open ``key`` (``/``-separated) below the directory ``dir_fd`` without
    following any symbolic link and without leaving it.

    Uses ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` where the kernel has
    it (Linux >= 5.6), else one ``openat(O_NOFOLLOW)`` per component. Open
    ``O_PATH`` to probe an entry; an ``O_PATH`` descriptor of the fallback may
    refer to a symbolic link itself (check ``S_ISLNK``).

    Raises
    ------
    UnsafeEntryError
        ``key`` is or passes through a symbolic link, or has a ``..``, ``.``
        or empty component.
    OSError
        As ``open`` (``FileNotFoundError`` for a missing entry).
    """
    _check_components(key)
    if USE_OPENAT2:
        fd = _openat2(dir_fd, key, flags, mode)
        if fd is not None:
            return fd
    return _open_walk(dir_fd, key, flags, mode)


def check_regular(fd: int, key: str) -> os.stat_result:
    """``fstat`` of an open entry; refuse (and close) anything but a regular file."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeEntryError(key, f"is {describe_mode(st.st_mode)}, not a regular file")
    return st


def describe_mode(mode: int) -> str:
    """``a symbolic link``, ``a FIFO``, ... for an ``st_mode``."""
    for test, text in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return text
    return "a special file"


def read_fd(fd: int) -> bytes:
    """Whole content of an open file (from its current offset)."""
    parts = [os.read(fd, os.fstat(fd).st_size + 1)]
    while parts[-1]:
        parts.append(os.read(fd, 1 << 16))
    return b"".join(parts)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` back to disk (no wait).

    A hint only (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): durability still
    comes from fsync/syncfs; where the call is missing nothing happens.
    """
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def write_file(
    path: str,
    buffers: list[Any],
    *,
    fsync: bool = False,
    writeback: bool = False,
    offset: int | None = None,
) -> int:
    """Write ``buffers`` to a new file at ``path``; return the bytes written.

    With ``offset`` the file is not truncated (created if missing) and the
    buffers go to that byte offset (positional writes: several processes write
    disjoint ranges of one shard file). With ``writeback`` the kernel starts
    writing the file to disk while it is being written (see
    :func:`start_writeback`), so that a later fsync/syncfs has little left to
    wait for.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
    fd = os.open(path, flags if offset is not None else flags | os.O_TRUNC, 0o644)
    base = offset or 0
    total = 0
    flushed = 0
    try:
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        while pending:
            batch = pending[:_IOV_MAX]
            if offset is None:
                written = os.writev(fd, batch)
            else:
                written = os.pwritev(fd, batch, base + total)
            if written <= 0:
                raise OSError(f"short write to {path!r}: {written} bytes written")
            total += written
            if writeback and total - flushed >= _WRITEBACK_BYTES:
                start_writeback(fd, base + flushed, total - flushed)
                flushed = total
            # drop what was fully written, trim a partially written buffer
            while batch and written >= len(batch[0]):
                written -= len(batch[0])
                batch.pop(0)
                pending.pop(0)
            if written:
                pending[0] = pending[0][written:]
        if writeback:
            start_writeback(fd, base + flushed, total - flushed)
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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
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
        return read_fd(fd)
    finally:
        os.close(fd)


def write_json(path: str, document: Any, *, fsync: bool = False) -> bytes:
    """Write ``document`` as UTF-8 JSON (durably if ``fsync``); return the bytes written."""
    data = dumps_json(document).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        pwrite_all(fd, data, 0)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
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
