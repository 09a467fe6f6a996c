"""Checkpoints on a local (or shared POSIX) filesystem: :class:`LocalStore`.

A save writes everything into a hidden sibling staging directory
(``.<name>.zarrckpt-tmp-<id>``), makes the data durable (one ``syncfs``),
writes the commit marker ``~commit/zarr.json`` last, and then publishes the
directory at its path with one atomic rename (``renameat2(RENAME_EXCHANGE)``
when replacing an existing checkpoint, so the path always holds the old or the
new one).

The commit marker is the ``zarr.json`` of an empty zarr group ``~commit``, its
members in the group's attributes, so that plain zarr lists a checkpoint
without warnings (zarr-python warns about every root entry that is not a zarr
node). Format version 1 kept them in the file ``zarrckpt.commit`` at the root;
readers accept both (docs/format.md, section 6).

Every system call goes through :mod:`zarrckpt.storage._posix`, looked up at
call time (``_posix.write_file(...)``) so that tests can inject faults there.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointExistsError, CorruptCheckpointError, InvalidPathError
from . import _liveness, _posix
from ._base import Kind, Staging, Store
from ._local_reader import LocalRangeReader, _DirHandle
from ._local_staging import LocalStaging, _join, write_commit_marker
from ._paths import (
    STAGING_INFIX,
    describe_contents,
    few,
    make_parents,
    missing_path_error,
    not_committed_error,
    wait_visible,
)

__all__ = ["LocalStore", "LocalStaging", "LocalRangeReader", "open_store", "write_commit_marker"]


_PIN_LOCK = threading.Lock()
#: open flags of a regular file read (O_NONBLOCK: a FIFO must not block the open)
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK
_PROBE_FLAGS = getattr(os, "O_PATH", os.O_RDONLY | os.O_NONBLOCK)


@dataclass(frozen=True)
class LocalStore(Store):
    """A checkpoint directory on a local or shared POSIX filesystem.

    The directory itself is found by its path as given (a symbolic link to a
    directory is fine) and held open from the first read on: every entry is
    then opened relative to it, beneath it and without following a symbolic
    link (:func:`~zarrckpt.storage._posix.open_beneath`). So a store that has
    read a checkpoint keeps reading that checkpoint even if a save with
    ``overwrite=True`` publishes another one at the path meanwhile; when the
    old one is deleted under it, reads raise
    :class:`~zarrckpt.errors.CorruptCheckpointError` saying so. A pickled store
    (a dask task) opens the path again where it is unpickled.

    Parameters
    ----------
    path
        The checkpoint directory (it need not exist yet).
    """

    path: str
    _pin: list[_DirHandle] = field(default_factory=list, compare=False, repr=False)

    def __reduce__(self) -> tuple[Any, ...]:  # the open directory stays in this process
        return (type(self), (self.path,))

    # ------------------------------------------------------------------ the open root

    def _root(self) -> tuple[int, bool]:
        """``(fd, owned)``: the pinned checkpoint directory, or the path opened now
        (following the user's path; ``owned``: the caller closes it)."""
        pin = self._pin
        if pin:
            return pin[0].fd, False
        return os.open(self.path, _DIR_FLAGS), True

    def pin(self) -> None:
        """Hold the directory now at the path open and read only from it from now on
        (:meth:`read_committed_root` does it; nothing there: nothing is held)."""
        try:
            handle = _DirHandle(os.open(self.path, _DIR_FLAGS))
        except OSError:
            handle = None
        with _PIN_LOCK:
            self._pin[:] = [handle] if handle is not None else []

    def zarr_store(self) -> Any:
        """A read-only zarr-python store of the checkpoint directory."""
        from zarr.storage import LocalStore as ZarrLocalStore

        return ZarrLocalStore(self.path, read_only=True)

    def read_committed_root(self) -> dict[str, Any]:
        self.pin()
        return super().read_committed_root()

    def _error(self, e: OSError, key: str) -> Exception:
        """A checkpoint error for ``e`` raised while opening ``key``, or ``e``."""
        if isinstance(e, _posix.UnsafeEntryError):
            return CorruptCheckpointError(
                f"checkpoint {self.path!r}: entry {key!r} {e.reason}; a checkpoint holds "
                "only regular files and directories (no symbolic links, devices or FIFOs, "
                "no '..'), and zarrckpt never reads outside the checkpoint directory"
            )
        if e.errno == errno.ENOENT and self._pin and self._replaced():
            return CorruptCheckpointError(
                f"checkpoint {self.path!r} was replaced or deleted while it was being "
                f"read ({key!r} is gone): nothing of the new checkpoint was mixed in; "
                "read it again"
            )
        return e

    def _replaced(self) -> bool:
        """True when the held directory is no longer the one at the path."""
        try:
            held = os.fstat(self._pin[0].fd)
            now = os.stat(self.path)
        except (OSError, IndexError):
            return True
        return held.st_nlink == 0 or (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino)

    def _open(self, key: str, flags: int) -> int:
        try:
            root, owned = self._root()
            try:
                return _posix.open_beneath(root, key, flags)
            finally:
                if owned:
                    os.close(root)
        except OSError as e:
            raise self._error(e, key) from None

    def _open_regular(self, key: str) -> tuple[int, int]:
        """``(fd, size)`` of the regular file ``key``, opened for reading."""
        fd = self._open(key, _READ_FLAGS)
        try:
            return fd, _posix.check_regular(fd, key).st_size
        except OSError as e:
            raise self._error(e, key) from None

    def _probe(self, key: str) -> tuple[int, int] | None:
        """``(st_mode, st_size)`` of ``key`` below the root (None: nothing there);
        a symbolic link anywhere on the way gives ``(S_IFLNK, 0)``."""
        try:
            root, owned = self._root()
            try:
                fd = _posix.open_beneath(root, key, _PROBE_FLAGS)
            finally:
                if owned:
                    os.close(root)
        except _posix.UnsafeEntryError:
            return stat.S_IFLNK, 0
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return st.st_mode, st.st_size

    # ------------------------------------------------------------------ probing

    def kind(self, key: str = "") -> Kind:
        if not key:
            p = self.path
            if os.path.isdir(p):
                return "dir"
            if os.path.isfile(p):
                return "file"
            return "other" if os.path.exists(p) else "missing"
        probed = self._probe(key)
        if probed is None:
            return "missing"
        if stat.S_ISDIR(probed[0]):
            return "dir"
        return "file" if stat.S_ISREG(probed[0]) else "other"

    def exists(self, key: str) -> bool:
        return self._probe(key) is not None

    def size(self, key: str) -> int:
        probed = self._probe(key)
        if probed is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.location(key))
        mode, size = probed
        if not stat.S_ISREG(mode):
            reason = f"is {_posix.describe_mode(mode)}, not a regular file"
            raise self._error(_posix.UnsafeEntryError(key, reason), key)
        return size

    def list_dir(self, key: str = "") -> list[str]:
        if not key:
            root, owned = self._root()
            try:
                return sorted(os.listdir(root))
            finally:
                if owned:
                    os.close(root)
        fd = self._open(key, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def location(self, key: str = "") -> str:
        return _join(self.path, key)

    # ------------------------------------------------------------------ reading

    def read_small(self, key: str) -> bytes:
        fd, _size = self._open_regular(key)
        try:
            return _posix.read_fd(fd)
        finally:
            os.close(fd)

    def open_reader(self, key: str) -> LocalRangeReader:
        fd, size = self._open_regular(key)
        return LocalRangeReader(fd, size)

    def missing_error(self) -> Exception:
        return missing_path_error(self.path)

    def not_committed_error(self) -> Exception:
        return not_committed_error(self.path)

    # ------------------------------------------------------------------ writing

    def check_writable(self, *, overwrite: bool) -> None:
        """Refuse to save over an existing path unless allowed and safe; create
        missing parent directories of a new path.

        With ``overwrite=True`` only a zarrckpt checkpoint holding nothing else,
        an empty directory or a regular file is replaced; any other directory is
        refused so that a typo cannot delete unrelated data.
        """
        from ._inplace import foreign_entries  # builds on this module's helpers

        self._pin.clear()  # a store that writes reads what is at the path from now on
        path = self.path
        if not os.path.lexists(path):
            make_parents(path)
            return
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        if is_dir and os.listdir(path) and not self.looks_like_checkpoint():
            _kind, text = describe_contents(path)
            raise CheckpointExistsError(
                f"refusing to save to {path!r}: it {text}, not a zarrckpt checkpoint. A "
                "checkpoint is written as a directory of its own (published by one atomic "
                "rename, which replaces the whole directory on overwrite), so it is never "
                "written into a directory holding other files: choose a new path such as "
                f"{os.path.join(path, 'checkpoint')!r}, or write beside those files with "
                "dcp.save(state_dict, storage_writer=zarrckpt.ZarrStorageWriter(path)), "
                "which keeps them"
            )
        if not overwrite:
            raise CheckpointExistsError(
                f"checkpoint path {path!r} already exists; pass overwrite=True to replace it "
                "(the old checkpoint stays intact until the new one is committed)"
            )
        foreign = foreign_entries(path) if is_dir else []
        if foreign:
            raise CheckpointExistsError(
                f"refusing to overwrite checkpoint {path!r}: besides the checkpoint it holds "
                f"{few(foreign)}, which replacing the checkpoint directory would delete; move "
                "them elsewhere, or overwrite with dcp.save(state_dict, storage_writer="
                "zarrckpt.ZarrStorageWriter(path, overwrite=True)), which replaces only the "
                "checkpoint's own entries"
            )

    def _staging_prefix(self) -> tuple[str, str]:
        parent, name = os.path.split(os.path.abspath(self.path))
        return parent, f".{name}{STAGING_INFIX}"

    def stage(self, *, overwrite: bool = False) -> LocalStaging:
        """Create a fresh staging directory beside the path, owned by this process
        until it is published or aborted (:mod:`~zarrckpt.storage._liveness`), after
        removing the stagings of dead saves to the path. (``overwrite`` is decided
        at publication, by an atomic rename.)"""
        _liveness.remove_stale(self.stale_stagings())
        parent, prefix = self._staging_prefix()
        directory = os.path.join(parent, f"{prefix}{uuid.uuid4().hex[:12]}")
        _liveness.claim(directory)
        try:
            os.mkdir(directory)
        except BaseException:
            _liveness.release(directory)
            raise
        return LocalStaging(directory, self.path)

    def stale_stagings(self) -> list[str]:
        """The staging directories (and orphaned owner records) of saves to this path
        whose process is provably dead (see :mod:`~zarrckpt.storage._liveness`);
        :meth:`stage` removes them."""
        return _liveness.stale_stagings(*self._staging_prefix())

    def attach(self, token: str, *, rank: int = 0) -> LocalStaging:
        parent, prefix = self._staging_prefix()
        if not os.path.basename(token).startswith(prefix):
            raise InvalidPathError(
                f"{token!r} is not a staging directory of checkpoint {self.path!r} "
                f"(expected {os.path.join(parent, prefix)}*)"
            )
        wait_visible(token, rank=rank)  # rank 0 created it (NFS attribute caches)
        return LocalStaging(token, self.path)

    def remove(self) -> None:
        _posix.remove_tree(self.path)


def open_store(path: str | os.PathLike[str] | Store) -> Store:
    """The store of a checkpoint location: an
    :class:`~zarrckpt.storage._object.ObjectStore` for an object-store URL (with
    the ``storage_options`` an :class:`~zarrckpt.storage._object_config.ObjectPath`
    carries; else from the environment), a :class:`LocalStore` for any other
    path (callers validate paths first, :func:`~zarrckpt.storage._paths.check_path`).
    A store is returned as it is; new stores go through :data:`STORE_WRAPPERS`."""
    if isinstance(path, Store):
        return path
    p = os.fspath(path)
    store: Store
    if is_object_url(p):
        from ._object import ObjectStore

        store = ObjectStore(p, getattr(p, "storage_options", None))
    else:
        store = LocalStore(p)
    for wrap in STORE_WRAPPERS:
        store = wrap(store)
    return store


def is_object_url(path: str) -> bool:
    """True for a URL served by the object-store backend (``s3://``, ``az://``, ``memory://``...)."""
    from ._object_config import OBJECT_SCHEMES

    scheme, sep, _rest = path.partition("://")
    return bool(sep) and scheme.lower() in OBJECT_SCHEMES


#: functions applied to every store :func:`open_store` opens, in order (tests wrap
#: stores with fault injection here: tests/_faults.py); empty in normal use
STORE_WRAPPERS: list[Callable[[Store], Store]] = []


def as_staging(staging: str | Staging) -> Staging:
    """A staging given as a directory path (the DCP plug-in's string tokens) or as it is."""
    if isinstance(staging, Staging):
        return staging
    from ._object_staging import TOKEN_PREFIX

    if staging.startswith(TOKEN_PREFIX):  # never a directory: object stores attach by store
        raise InvalidPathError(
            f"{staging!r} is the staging of an object-store save, not a staging directory; "
            "attach to it with ObjectStore.attach"
        )
    return LocalStaging(staging)
