"""Checkpoint directories on a local filesystem: staging, durability, commit.

A save writes everything into a hidden sibling staging directory
(``.<name>.zarrckpt-tmp-<id>``), makes the data durable, writes the commit
marker ``~commit/zarr.json`` last, and then publishes the directory at its path
with one atomic rename (``renameat2(RENAME_EXCHANGE)`` when replacing an
existing checkpoint, so the path always holds the old or the new one).

The commit marker is the ``zarr.json`` of an empty zarr group ``~commit``, its
members in the group's attributes, so that plain zarr lists a checkpoint
without warnings (zarr-python warns about every root entry that is not a zarr
node). Format version 1 kept them in the file ``zarrckpt.commit`` at the root
(:data:`LEGACY_COMMIT_MARKER`); readers accept both (docs/format.md, section 6).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import uuid
from typing import Any

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from ..format._chunkio import crc32c
from ..format._marker import (
    COMMIT_ATTRIBUTE,
    COMMIT_GROUP,
    COMMIT_MARKER,
    FORMAT_NAME,
    FORMAT_VERSION,
    LEGACY_COMMIT_MARKER,
    ROOT_METADATA,
)

__all__ = [
    "COMMIT_MARKER",
    "COMMIT_GROUP",
    "LEGACY_COMMIT_MARKER",
    "find_commit_marker",
    "parse_commit_marker",
    "marker_location_problem",
    "ROOT_METADATA",
    "FORMAT_NAME",
    "FORMAT_VERSION",
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
]

_STAGING_INFIX = ".zarrckpt-tmp-"

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


_LIBC = _libc()


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


def find_commit_marker(path: str) -> str:
    """Relative path of the commit marker of checkpoint ``path``.

    :data:`COMMIT_MARKER`, unless only a format version 1 marker
    (:data:`LEGACY_COMMIT_MARKER`) exists. The result may not exist (an
    uncommitted checkpoint).
    """
    if not os.path.lexists(os.path.join(path, COMMIT_MARKER)) and os.path.lexists(
        os.path.join(path, LEGACY_COMMIT_MARKER)
    ):
        return LEGACY_COMMIT_MARKER
    return COMMIT_MARKER


def parse_commit_marker(document: Any, name: str) -> dict[str, Any] | None:
    """The marker's members (``format``, ``format_version``, ...) from the JSON
    ``document`` read at ``name``, or None when it is not a zarrckpt commit marker.

    A marker at :data:`COMMIT_MARKER` is a zarr group document holding the
    members in ``attributes.zarrckpt_commit``; a marker at
    :data:`LEGACY_COMMIT_MARKER` holds them at its top level.
    """
    if name == LEGACY_COMMIT_MARKER:
        marker = document
    elif isinstance(document, dict) and isinstance(document.get("attributes"), dict):
        marker = document["attributes"].get(COMMIT_ATTRIBUTE)
    else:
        return None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        return None
    return marker


def marker_location_problem(path: str, name: str, version: int) -> str | None:
    """Why a marker of format ``version`` must not be at ``name``, or None when it may.

    Format version 1 keeps the marker in :data:`LEGACY_COMMIT_MARKER`, later
    versions in :data:`COMMIT_MARKER`.
    """
    if (version == 1) == (name == LEGACY_COMMIT_MARKER):
        return None
    expected = LEGACY_COMMIT_MARKER if version == 1 else COMMIT_MARKER
    return (
        f"checkpoint {path!r}: its commit marker {name!r} has format version {version}, "
        f"whose commit marker is {expected!r}"
    )


def is_checkpoint_dir(path: str) -> bool:
    """True when ``path`` looks like a zarrckpt checkpoint (committed or not)."""
    if any(
        os.path.isfile(os.path.join(path, name))
        for name in (COMMIT_MARKER, LEGACY_COMMIT_MARKER)
    ):
        return True
    try:
        with open(os.path.join(path, ROOT_METADATA), "rb") as f:
            root = json.loads(f.read())
        return FORMAT_NAME in root.get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def check_writable(path: str, *, overwrite: bool) -> None:
    """Refuse to save over an existing path unless allowed and safe; create
    missing parent directories of a new path.

    With ``overwrite=True`` only a zarrckpt checkpoint holding nothing else,
    an empty directory or a regular file is replaced; any other directory is
    refused so that a typo cannot delete unrelated data.
    """
    # imported here: _paths and _inplace build on this module
    from ._inplace import foreign_entries
    from ._paths import describe_contents, few, make_parents

    if not os.path.lexists(path):
        make_parents(path)
        return
    is_dir = os.path.isdir(path) and not os.path.islink(path)
    if is_dir and os.listdir(path) and not is_checkpoint_dir(path):
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


def new_staging_dir(path: str) -> str:
    """Create and return a fresh staging directory beside ``path``."""
    parent, name = os.path.split(os.path.abspath(path))
    staging = os.path.join(parent, f".{name}{_STAGING_INFIX}{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    return staging


#: objects nested deeper than this are written on one line by :func:`dumps_json`
_JSON_LINE_DEPTH = 4


def dumps_json(document: Any, *, _depth: int = 0) -> str:
    """``document`` as JSON text: objects down to depth 4 one member per line
    (indent 1), everything deeper on one line.

    Readable (one manifest entry per line) and fast: the one-line parts go
    through the C encoder, which ``json.dumps(..., indent=...)`` never uses, so
    the manifest of 100,000 tensors is written in a fraction of the time.
    NaN and infinities are refused (``ValueError``) at every level, and so
    are object keys that are not ``str`` (``TypeError``) in the expanded ones.
    """
    if not isinstance(document, dict) or not document or _depth >= _JSON_LINE_DEPTH:
        return json.dumps(document, allow_nan=False, ensure_ascii=False, separators=(", ", ": "))
    pad = " " * (_depth + 1)
    for key in document:
        if not isinstance(key, str):
            raise TypeError(f"JSON object keys must be str, not {type(key).__name__} ({key!r})")
    members = ",\n".join(
        f"{pad}{json.dumps(k, ensure_ascii=False)}: {dumps_json(v, _depth=_depth + 1)}"
        for k, v in document.items()
    )
    return "{\n" + members + "\n" + " " * _depth + "}"


def write_json(path: str, document: Any, *, fsync: bool = False) -> bytes:
    """Write ``document`` as UTF-8 JSON (durably if ``fsync``); return the bytes written."""
    data = dumps_json(document).encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return data


def _fsync_path(path: str) -> None:
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
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def write_commit_marker(
    staging: str,
    root_bytes: bytes,
    checkpoint_id: str,
    *,
    fsync: bool,
    format_version: int = FORMAT_VERSION,
) -> None:
    """Write the commit marker (last file of a checkpoint): ``~commit/zarr.json``."""
    marker = {
        "format": FORMAT_NAME,
        "format_version": format_version,
        "checkpoint_id": checkpoint_id,
        "root_metadata_crc32c": crc32c(root_bytes),
    }
    group = os.path.join(staging, COMMIT_GROUP)
    os.makedirs(group, exist_ok=True)
    marker_path = os.path.join(staging, *COMMIT_MARKER.split("/"))
    document = {"zarr_format": 3, "node_type": "group", "attributes": {COMMIT_ATTRIBUTE: marker}}
    write_json(marker_path, document)
    if fsync:
        _fsync_path(marker_path)
        _fsync_path(group)
        _fsync_path(staging)


def commit(
    staging: str,
    path: str,
    root: dict[str, Any],
    checkpoint_id: str,
    *,
    overwrite: bool,
    fsync: bool,
) -> None:
    """Write the root ``zarr.json`` and the commit marker, then publish ``staging`` at ``path``.

    The last step of every writer (``save``, the DCP plug-in, the converters):
    the array data must already be in ``staging`` (and durable, with ``fsync``).
    """
    root_bytes = write_json(os.path.join(staging, ROOT_METADATA), root, fsync=fsync)
    version = root["attributes"][FORMAT_NAME].get("format_version", FORMAT_VERSION)
    write_commit_marker(staging, root_bytes, checkpoint_id, fsync=fsync, format_version=version)
    publish(staging, path, overwrite=overwrite, fsync=fsync)


def remove_tree(path: str) -> None:
    """Delete a file or directory tree, ignoring one that is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def publish(staging: str, path: str, *, overwrite: bool, fsync: bool) -> None:
    """Atomically move the committed ``staging`` directory to ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
        if not overwrite:  # appeared while we were writing
            raise CheckpointExistsError(f"checkpoint path {path!r} already exists")
        if _renameat2(staging, path, _RENAME_EXCHANGE):
            remove_tree(staging)  # now holds the previous checkpoint
        else:  # no atomic exchange here: short window where path is absent
            trash = staging + ".old"
            os.rename(path, trash)
            os.rename(staging, path)
            remove_tree(trash)
    elif not _renameat2(staging, path, _RENAME_NOREPLACE):
        os.rename(staging, path)
    if fsync:
        _fsync_path(parent)


def read_committed_root(path: str) -> dict[str, Any]:
    """Return the root ``zarr.json`` of a committed checkpoint, after checking the marker.

    Raises
    ------
    CheckpointNotFoundError
        Nothing at ``path``, or not a zarrckpt checkpoint (the message says what
        the path holds: a DCP checkpoint, a directory of checkpoints, ...).
    IncompleteCheckpointError
        No commit marker (the save never finished) or a marker of another format.
        The marker is ``~commit/zarr.json``, or ``zarrckpt.commit`` in a format
        version 1 checkpoint.
    CorruptCheckpointError
        The root metadata is unreadable or does not match the marker's checksum.
    """
    from ._paths import missing_path_error, not_committed_error  # builds on this module

    if not os.path.exists(path):
        raise missing_path_error(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(
            f"{path!r} is a file, not a zarrckpt checkpoint directory "
            "(use zarrckpt.convert for torch.save or safetensors files)"
        )
    name = find_commit_marker(path)
    marker_path = os.path.join(path, *name.split("/"))
    try:
        with open(marker_path, "rb") as f:
            document = json.loads(f.read())
    except FileNotFoundError:
        raise not_committed_error(path) from None
    except ValueError as e:
        raise CorruptCheckpointError(
            f"checkpoint {path!r}: commit marker {name!r} is not valid JSON ({e})"
        ) from None
    marker = parse_commit_marker(document, name)
    if marker is None:
        raise IncompleteCheckpointError(
            f"checkpoint {path!r}: {name!r} is not a zarrckpt commit marker"
        )
    version = marker.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"checkpoint {path!r} has format version {version!r}; this zarrckpt reads "
            f"versions up to {FORMAT_VERSION}: upgrade zarrckpt"
        )
    problem = marker_location_problem(path, name, version)
    if problem is not None:
        raise CorruptCheckpointError(problem)
    root_path = os.path.join(path, ROOT_METADATA)
    try:
        with open(root_path, "rb") as f:
            root_bytes = f.read()
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint {path!r}: root metadata {ROOT_METADATA!r} is missing"
        ) from None
    if crc32c(root_bytes) != marker.get("root_metadata_crc32c"):
        raise CorruptCheckpointError(
            f"checkpoint {path!r}: root metadata {ROOT_METADATA!r} does not match the "
            "checksum recorded in the commit marker (damaged or modified after commit)"
        )
    try:
        root = json.loads(root_bytes)
        manifest = root["attributes"][FORMAT_NAME]
        same = (
            manifest["format_version"] == version
            and manifest["checkpoint_id"] == marker.get("checkpoint_id")
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {path!r}: root metadata {ROOT_METADATA!r} is not a zarrckpt "
            f"group document ({e!r})"
        ) from None
    if not same:
        raise CorruptCheckpointError(
            f"checkpoint {path!r}: the manifest (format_version "
            f"{manifest.get('format_version')!r}, checkpoint_id "
            f"{manifest.get('checkpoint_id')!r}) does not match the commit marker "
            f"(format_version {version!r}, checkpoint_id {marker.get('checkpoint_id')!r})"
        )
    return dict(root)
