"""File operations on foreign files: ``torch.save``, safetensors and DCP files.

zarrckpt checkpoints are read and written through :class:`~zarrckpt.storage._base.Store`
and :class:`~zarrckpt.storage._base.Staging`. The interop layer also reads and
writes files of other formats, which are memory-mapped, streamed or written at
byte offsets by position; their raw file operations live here, so that no module
outside :mod:`zarrckpt.storage` opens, writes, syncs, renames or probes a file
itself. (Libraries that open a path themselves, such as ``torch.load(mmap=True)``,
``zipfile.is_zipfile`` or DCP's ``FileSystemWriter``, are given the path.)
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from typing import Any

from . import _posix

__all__ = [
    "PositionalFile",
    "file_identity",
    "file_version",
    "file_size",
    "is_dir",
    "is_file",
    "is_link",
    "is_zip_file",
    "lexists",
    "list_dir",
    "make_dirs",
    "make_temp_dir",
    "new_temp_path",
    "open_read",
    "read_bytes",
    "read_head",
    "read_text",
    "redirect_fd_to_devnull",
    "remove_file",
    "write_bytes",
]


def is_file(path: str) -> bool:
    """True for a regular file (a link to one counts)."""
    return os.path.isfile(path)


def is_dir(path: str) -> bool:
    """True for a directory (a link to one counts)."""
    return os.path.isdir(path)


def is_link(path: str) -> bool:
    """True for a symbolic link."""
    return os.path.islink(path)


def is_zip_file(path: str) -> bool:
    """True for a zip archive (a ``torch.save`` file of the current format)."""
    return zipfile.is_zipfile(path)


def lexists(path: str) -> bool:
    """True when something is at ``path`` (a dangling link counts)."""
    return os.path.lexists(path)


def file_size(path: str) -> int:
    """Size of the file ``path`` in bytes (raises :class:`OSError`)."""
    return os.path.getsize(path)


def list_dir(path: str) -> list[str]:
    """Names in the directory ``path`` (unsorted, as the system returns them)."""
    return os.listdir(path)


def file_version(path: str) -> str:
    """Size and modification time of the file ``path`` (``"<bytes>:<mtime ns>"``): the
    same on every host that sees one version of a shared file."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def file_identity(path: str) -> tuple[int, int, int]:
    """(device major, device minor, inode) of the file ``path``, as
    ``/proc/self/maps`` names a mapped file."""
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def make_dirs(path: str) -> None:
    """Create the directory ``path`` and its missing parents."""
    os.makedirs(path, exist_ok=True)


def make_temp_dir(prefix: str) -> str:
    """Create a new private directory in the system temporary directory; return its path."""
    return tempfile.mkdtemp(prefix=prefix)


def new_temp_path(prefix: str) -> str:
    """A fresh unused path in the system temporary directory (nothing is left there)."""
    fd, path = tempfile.mkstemp(prefix=prefix)
    os.close(fd)
    remove_file(path)
    return path


def remove_file(path: str) -> None:
    """Delete the file ``path`` (nothing there is fine)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def open_read(path: str) -> io.BufferedReader:
    """The file ``path`` open for buffered binary reading (zip readers, memory maps,
    DCP's file views); the caller closes it."""
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def read_head(path: str, n: int) -> bytes:
    """The first ``n`` bytes of the file ``path`` (fewer if it is shorter)."""
    with open(path, "rb") as f:
        return f.read(n)


def read_bytes(path: str) -> bytes:
    """Whole content of the file ``path``."""
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    """Whole content of the text file ``path`` (UTF-8, undecodable bytes replaced)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def write_bytes(path: str, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` as the file ``path`` (durably with ``fsync``)."""
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def redirect_fd_to_devnull(fd: int) -> None:
    """Point the file descriptor ``fd`` at ``/dev/null`` (a closed stdout pipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)


class PositionalFile:
    """A file open for positional reads and writes (``pread``/``pwrite``), written
    in place by offset: a ``torch.save`` archive's records, a safetensors file.

    Parameters
    ----------
    path
        The file.
    create
        Create (or truncate) the file for writing only; else open an existing
        file for reading and writing.
    """

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if create else os.O_RDWR
        self._fd: int | None = os.open(path, flags, 0o644)

    def _handle(self) -> int:
        if self._fd is None:
            raise ValueError(f"file {self.path!r} is closed")
        return self._fd

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset``."""
        return os.pread(self._handle(), n, offset)

    def pwrite_all(self, data: Any, offset: int) -> None:
        """Write every byte of ``data`` (any buffer, not copied) at ``offset``."""
        _posix.pwrite_all(self._handle(), data, offset)

    def truncate(self, size: int) -> None:
        """Cut (or extend) the file to ``size`` bytes."""
        os.ftruncate(self._handle(), size)

    def fsync(self) -> None:
        """Make the file durable."""
        os.fsync(self._handle())

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> PositionalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
