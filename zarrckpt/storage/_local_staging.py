"""The staging directory of a save to a local path: :class:`LocalStaging`.

A save writes everything into a hidden sibling directory of its path
(``.<name>.zarrckpt-tmp-<id>``, created by
:meth:`~zarrckpt.storage._local.LocalStore.stage`), writes the commit marker
last (:func:`write_commit_marker`) and publishes the directory at the path with
one atomic rename (:meth:`LocalStaging.publish`).

Every system call goes through :mod:`zarrckpt.storage._posix`, looked up at
call time (``_posix.write_file(...)``) so that tests can inject faults there.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointExistsError, InvalidPathError
from ..format._marker import (
    COMMIT_GROUP,
    COMMIT_MARKER,
    FORMAT_NAME,
    FORMAT_VERSION,
    ROOT_METADATA,
    marker_document,
)
from . import _liveness, _posix
from ._base import Staging

__all__ = ["LocalStaging", "write_commit_marker"]


def _join(root: str, key: str) -> str:
    """The path of ``key`` below ``root`` (``os.path.join`` of its parts, without the
    split in the common case)."""
    if not key:
        return root
    if root and not root.endswith("/"):
        return f"{root}/{key}"
    return os.path.join(root, *key.split("/"))


@dataclass
class LocalStaging(Staging):
    """A staging directory of a save to ``path`` (``None``: a directory written
    into only, never committed)."""

    directory: str
    path: str | None = None
    #: directories this object created or found (metadata and chunk writes of one
    #: array ask for the same one: one mkdir, not two)
    _dirs: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def token(self) -> str:
        return self.directory

    @property
    def local_dir(self) -> str:
        return self.directory

    def _target(self) -> str:
        if self.path is None:
            raise InvalidPathError(f"staging {self.directory!r} has no checkpoint path")
        return self.path

    def ensure_dir(self, key: str) -> None:
        if key in self._dirs:
            return
        _posix.mkdir_fast(_join(self.directory, key))
        self._dirs.add(key)

    def write_small(self, key: str, data: bytes) -> None:
        _posix.write_small(_join(self.directory, key), data)

    def write_chunk(self, key: str, buffers: list[Any], *, writeback: bool = False) -> int:
        path = _join(self.directory, key)
        # looked up on the module so tests can inject failures (_posix.write_file)
        if writeback:
            return _posix.write_file(path, buffers, writeback=True)
        return _posix.write_file(path, buffers)

    def write_chunk_at(
        self, key: str, offset: int, buffers: list[Any], *, writeback: bool = False
    ) -> int:
        path = _join(self.directory, key)
        # looked up on the module so tests can inject failures (_posix.write_file)
        return _posix.write_file(path, buffers, writeback=writeback, offset=offset)

    def write_json(self, key: str, document: Any, *, fsync: bool = False) -> bytes:
        return _posix.write_json(_join(self.directory, key), document, fsync=fsync)

    def read_small(self, key: str) -> bytes:
        return _posix.read_small(_join(self.directory, key))

    def sync(self) -> None:
        _posix.sync_tree(self.directory)

    def commit(
        self, root: dict[str, Any], checkpoint_id: str, *, overwrite: bool, fsync: bool
    ) -> None:
        """Write the root ``zarr.json`` and the commit marker, then publish the
        directory at the path. The array data must already be in the staging
        (and durable, with ``fsync``)."""
        root_bytes = self.write_json(ROOT_METADATA, root, fsync=fsync)
        version = root["attributes"][FORMAT_NAME].get("format_version", FORMAT_VERSION)
        write_commit_marker(
            self.directory, root_bytes, checkpoint_id, fsync=fsync, format_version=version
        )
        self.publish(overwrite=overwrite, fsync=fsync)

    def publish(self, *, overwrite: bool, fsync: bool) -> None:
        """Atomically move the staging directory to the path."""
        staging, path = self.directory, self._target()
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.lexists(path):
            if not overwrite:  # appeared while we were writing
                raise CheckpointExistsError(f"checkpoint path {path!r} already exists")
            if _posix._renameat2(staging, path, _posix._RENAME_EXCHANGE):
                _posix.remove_tree(staging)  # now holds the previous checkpoint
            else:  # no atomic exchange here: short window where path is absent
                trash = staging + ".old"
                os.rename(path, trash)
                os.rename(staging, path)
                _posix.remove_tree(trash)
        else:
            try:
                if not _posix._renameat2(staging, path, _posix._RENAME_NOREPLACE):
                    os.rename(staging, path)
            except OSError as e:
                # another save published at the path since the check (a lost race)
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise CheckpointExistsError(
                    f"checkpoint path {path!r} already exists: another save published a "
                    "checkpoint there while this one was being written (overwrite=False)"
                ) from None
        if fsync:
            _posix.fsync_path(parent)
        _liveness.release(staging)

    def publish_file(
        self, name: str, *, overwrite: bool, fsync: bool, synced: bool = False
    ) -> None:
        path = self._target()
        tmp = _join(self.directory, name)
        if not overwrite and os.path.lexists(path):
            raise CheckpointExistsError(f"{path!r} already exists")
        if fsync and not synced:
            _posix.fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            _posix.fsync_path(os.path.dirname(os.path.abspath(path)))
        self.abort()

    def abort(self) -> None:
        _posix.remove_tree(self.directory)
        _liveness.release(self.directory)


def write_commit_marker(
    directory: str,
    root_bytes: bytes,
    checkpoint_id: str,
    *,
    fsync: bool,
    format_version: int = FORMAT_VERSION,
) -> None:
    """Write the commit marker (last file of a checkpoint): ``~commit/zarr.json``."""
    group = os.path.join(directory, COMMIT_GROUP)
    os.makedirs(group, exist_ok=True)
    marker_path = _join(directory, COMMIT_MARKER)
    _posix.write_json(marker_path, marker_document(root_bytes, checkpoint_id, format_version))
    if fsync:
        _posix.fsync_path(marker_path)
        _posix.fsync_path(group)
        _posix.fsync_path(directory)


