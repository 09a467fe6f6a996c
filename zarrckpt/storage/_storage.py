"""Compatibility functions for the interop layer (issue 12, phase 2).

The storage lives behind :class:`~zarrckpt.storage._base.Store` and
:class:`~zarrckpt.storage._base.Staging` now (local implementation:
:mod:`zarrckpt.storage._local`, system calls: :mod:`zarrckpt.storage._posix`).
The converters and the DCP plug-ins still call these path-based functions;
each is a thin wrapper over the interface, to be removed once they are
rewired onto it. No module of the format, storage, parallel, api or inspect
layers uses this one.
"""

from __future__ import annotations

from typing import Any

from ..format._json import dumps_json
from ..format._marker import (
    COMMIT_ATTRIBUTE,
    COMMIT_GROUP,
    COMMIT_MARKER,
    FORMAT_NAME,
    FORMAT_VERSION,
    LEGACY_COMMIT_MARKER,
    ROOT_METADATA,
    marker_location_problem,
    parse_commit_marker,
)
from . import _local, _posix
from ._local import LocalStaging, LocalStore
from ._paths import STAGING_INFIX as _STAGING_INFIX

__all__ = [
    "COMMIT_ATTRIBUTE",
    "COMMIT_MARKER",
    "COMMIT_GROUP",
    "LEGACY_COMMIT_MARKER",
    "find_commit_marker",
    "parse_commit_marker",
    "marker_location_problem",
    "ROOT_METADATA",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "is_checkpoint_dir",
    "check_writable",
    "new_staging_dir",
    "sync_tree",
    "write_json",
    "dumps_json",
    "write_commit_marker",
    "publish",
    "commit",
    "remove_tree",
    "read_committed_root",
    "_STAGING_INFIX",
]


def find_commit_marker(path: str) -> str:
    """:meth:`Store.find_commit_marker` of the local checkpoint ``path``."""
    return LocalStore(path).find_commit_marker()


def is_checkpoint_dir(path: str) -> bool:
    """:meth:`Store.looks_like_checkpoint` of the local path ``path``."""
    return LocalStore(path).looks_like_checkpoint()


def check_writable(path: str, *, overwrite: bool) -> None:
    """:meth:`Store.check_writable` of the local path ``path``."""
    LocalStore(path).check_writable(overwrite=overwrite)


def new_staging_dir(path: str) -> str:
    """:meth:`Store.stage` for ``path``; returns the staging directory."""
    return LocalStore(path).stage().token


def sync_tree(root: str) -> None:
    """:meth:`Staging.sync` of the directory ``root``."""
    _posix.sync_tree(root)


def write_json(path: str, document: Any, *, fsync: bool = False) -> bytes:
    """:func:`zarrckpt.storage._posix.write_json`."""
    return _posix.write_json(path, document, fsync=fsync)


def _fsync_path(path: str) -> None:
    _posix.fsync_path(path)


def remove_tree(path: str) -> None:
    """:func:`zarrckpt.storage._posix.remove_tree`."""
    _posix.remove_tree(path)


def write_commit_marker(
    staging: str,
    root_bytes: bytes,
    checkpoint_id: str,
    *,
    fsync: bool,
    format_version: int = FORMAT_VERSION,
) -> None:
    """:func:`zarrckpt.storage._local.write_commit_marker`."""
    _local.write_commit_marker(
        staging, root_bytes, checkpoint_id, fsync=fsync, format_version=format_version
    )


def publish(staging: str, path: str, *, overwrite: bool, fsync: bool) -> None:
    """:meth:`Staging.publish` of the staging directory ``staging`` of ``path``."""
    LocalStaging(staging, path).publish(overwrite=overwrite, fsync=fsync)


def commit(
    staging: str,
    path: str,
    root: dict[str, Any],
    checkpoint_id: str,
    *,
    overwrite: bool,
    fsync: bool,
) -> None:
    """:meth:`Staging.commit` of the staging directory ``staging`` of ``path``."""
    LocalStaging(staging, path).commit(root, checkpoint_id, overwrite=overwrite, fsync=fsync)


def read_committed_root(path: str) -> dict[str, Any]:
    """:meth:`Store.read_committed_root` of the local checkpoint ``path``."""
    return LocalStore(path).read_committed_root()
