"""Paths given to zarrckpt: validation at every entry point, parent creation,
and what a path holds when it is not a committed checkpoint.

Every public function taking a path (``save``, ``load``, ``async_save``,
``open``, ``verify``, the converters, the DCP plug-ins, hence the command
line) calls :func:`check_path` first. Errors name the path and say what it is
and what to do, rather than a generic "commit marker missing". Imports
neither torch nor zarr (the command line uses it).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from ..errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    InvalidPathError,
    ZarrCkptError,
)
from ..format._json import loads_json
from ..format._marker import COMMIT_MARKER, FORMAT_NAME, LEGACY_COMMIT_MARKER, ROOT_METADATA

__all__ = [
    "check_path",
    "make_parents",
    "wait_visible",
    "not_committed_error",
    "missing_path_error",
    "describe_contents",
    "few",
    "STAGING_INFIX",
    "DCP_METADATA",
]

#: the staging directory of a save to ``dir/name`` is ``dir/.name.zarrckpt-tmp-<12 hex>``
STAGING_INFIX = ".zarrckpt-tmp-"
#: DCP's global metadata file (``FileSystemWriter``)
DCP_METADATA = ".metadata"

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: seconds a rank waits for a directory rank 0 created to become visible to it
VISIBILITY_TIMEOUT = 5.0
#: entries examined when describing a directory (the temp directory may hold many)
_SCAN_LIMIT = 5000


def check_path(
    path: Any,
    *,
    storage_options: dict[str, Any] | None = None,
    role: str = "checkpoint path",
) -> str:
    """``path`` as a ``str``, after refusing what zarrckpt cannot use.

    An object-store URL (``s3://bucket/prefix``, ``az://container/prefix``,
    ``memory://name/prefix``) is
    returned as an :class:`~zarrckpt.storage._object_config.ObjectPath`
    carrying ``storage_options``; ``file://`` URLs become local paths.

    Raises
    ------
    zarrckpt.errors.InvalidPathError
        The path is empty, is a URL of an unsupported scheme (``gs://``: not
        yet), or
        ``storage_options`` is given for a local path (they apply only to
        object-store URLs).
    """
    from ._object_config import OBJECT_SCHEMES, UNSUPPORTED_SCHEMES, ObjectPath, parse_url

    if isinstance(path, ObjectPath) and storage_options is None:
        return path
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if p == "":
        raise InvalidPathError(
            f"the {role} is empty (''); pass a path such as 'checkpoints/step_100'"
        )
    url = _URL.match(p)
    if url and url.group(1).lower() == "file":
        p = p[len(url.group(0)) :]
        if not p.startswith("/"):
            raise InvalidPathError(f"{role} {path!r}: a file:// URL takes an absolute path")
        url = None
    if url:
        scheme = url.group(1).lower()
        if scheme in UNSUPPORTED_SCHEMES:
            raise InvalidPathError(f"{role} {p!r}: {UNSUPPORTED_SCHEMES[scheme]}")
        if scheme not in OBJECT_SCHEMES:
            raise InvalidPathError(
                f"{role} {p!r} is a URL of scheme {url.group(1)}://, which zarrckpt does not "
                f"support; object-store URLs: {', '.join(s + '://' for s in OBJECT_SCHEMES)} "
                "(S3 and S3-compatible servers, Azure Blob Storage, the process's memory), "
                "local paths: a path or file://"
            )
        parse_url(p)  # a bucket is named
        return ObjectPath(p, storage_options)
    if storage_options is not None:
        raise InvalidPathError(
            f"storage_options were given for the local {role} {p!r}: they apply only to "
            "object-store URLs (s3://..., az://...); leave storage_options=None"
        )
    return p


def make_parents(path: str) -> None:
    """Create the missing parent directories of ``path`` (as ``dcp.save`` does).

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        A component of the parent path exists and is not a directory.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        return
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise CheckpointNotFoundError(
            f"cannot create the parent directory {parent!r} of {path!r}: "
            f"{e.strerror or e} ({e.filename!r} is not a directory)"
        ) from None


def wait_visible(directory: str, *, rank: int, timeout: float | None = None) -> None:
    """Wait until ``directory`` (created by rank 0) is visible on this rank.

    Shared filesystems such as NFS may show a directory created on another
    host only after a moment (attribute caches); a rank that never sees it is
    not on the same filesystem.

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        Still invisible after ``timeout`` seconds (default :data:`VISIBILITY_TIMEOUT`).
    """
    timeout = VISIBILITY_TIMEOUT if timeout is None else timeout
    delay, deadline = 0.01, time.monotonic() + timeout
    while not os.path.isdir(directory):
        if time.monotonic() >= deadline:
            raise CheckpointNotFoundError(
                f"rank {rank} cannot see the staging directory {directory!r} that rank 0 "
                f"created (waited {timeout:g} s): every rank must reach the checkpoint path on "
                "a filesystem they share"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


# --------------------------------------------------------------------- what is there


def _natural(name: str) -> list[Any]:
    """Sort key that orders step_9 before step_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def few(names: Iterable[str], n: int = 4) -> str:
    """``'a', 'b', 'c' and 5 more`` (names quoted, in the given order)."""
    names = list(names)
    shown = ", ".join(repr(x) for x in names[:n])
    return shown if len(names) <= n else f"{shown} and {len(names) - n} more"


def _is_zarrckpt_root(path: str) -> bool:
    try:
        with open(os.path.join(path, ROOT_METADATA), "rb") as f:
            root = loads_json(f.read())
        return FORMAT_NAME in root.get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def _is_dcp(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DCP_METADATA))


def _listing(path: str) -> tuple[list[str], bool]:
    """Up to ``_SCAN_LIMIT`` entry names of a directory (naturally sorted), and
    whether there were more."""
    names: list[str] = []
    with os.scandir(path) as it:
        for entry in it:
            if len(names) >= _SCAN_LIMIT:
                return sorted(names, key=_natural), True
            names.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return sorted(names, key=_natural), False


def describe_contents(path: str) -> tuple[str, str]:
    """What an existing directory that is no committed checkpoint holds.

    Returns ``(kind, text)``: ``kind`` is ``"empty"``, ``"dcp"`` (a DCP
    checkpoint), ``"incomplete"`` (a zarrckpt checkpoint without commit
    marker, or staging left inside it), ``"checkpoints"`` (a directory of
    checkpoints) or ``"other"``; ``text`` completes "``path`` ...".
    """
    names, more = _listing(path)
    if not names:
        return "empty", "is an empty directory"
    if _is_zarrckpt_root(path):
        return "incomplete", "holds a zarrckpt checkpoint"
    if _is_dcp(path):
        return "dcp", (
            "holds a DCP (torch.distributed.checkpoint) checkpoint: its '.metadata' and "
            "'*.distcp' files were written by DCP's FileSystemWriter"
        )
    staging = [n.rstrip("/") for n in names if n.startswith(STAGING_INFIX)]
    if staging:
        return "incomplete", (
            f"holds the staging directory {staging[0]!r} of a save that did not finish "
            "(or is still running)"
        )
    special = (
        " (the system temporary directory)" if _same(path, tempfile.gettempdir()) else ""
    )
    subdirs = [n.rstrip("/") for n in names if n.endswith("/")]
    ours = [
        n
        for n in subdirs
        if any(
            os.path.isfile(os.path.join(path, n, marker))
            for marker in (COMMIT_MARKER, LEGACY_COMMIT_MARKER)
        )
    ]
    if ours:
        return "checkpoints", (
            f"is not a checkpoint itself but a directory{special} holding "
            f"{len(ours)} zarrckpt checkpoint(s) ({few(ours)}): pass one of them, e.g. "
            f"{os.path.join(path, ours[-1])!r}"
        )
    theirs = [n for n in subdirs if _is_dcp(os.path.join(path, n))]
    if theirs:
        return "checkpoints", (
            f"is not a checkpoint itself but a directory{special} holding "
            f"{len(theirs)} DCP checkpoint(s) ({few(theirs)}): load one with dcp.load "
            "or convert it with zarrckpt.convert.from_dcp"
        )
    count = f"more than {len(names)}" if more else str(len(names))
    return "other", f"is a directory{special} holding {count} entries ({few(names)})"


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def not_committed_error(path: str) -> ZarrCkptError:
    """The error for an existing directory without commit marker: incomplete
    only when it is (or is becoming) a zarrckpt checkpoint, else what it is."""
    try:
        kind, text = describe_contents(path)
    except OSError as e:
        return CheckpointNotFoundError(f"{path!r} is not a readable directory: {e}")
    if kind == "incomplete":
        return IncompleteCheckpointError(
            f"checkpoint {path!r} is incomplete: its commit marker {COMMIT_MARKER!r} is "
            f"missing (the save that wrote it did not finish); it {text}"
        )
    if kind == "dcp":
        return CheckpointNotFoundError(
            f"{path!r} is not a zarrckpt checkpoint: it {text}. Load it with "
            "torch.distributed.checkpoint.load(state_dict, checkpoint_id=path) (DCP's "
            "FileSystemReader; ZarrStorageReader reads zarrckpt checkpoints only), or "
            "convert it once with zarrckpt.convert.from_dcp(path, dst)"
        )
    if kind == "checkpoints":
        return CheckpointNotFoundError(f"{path!r} {text}")
    return CheckpointNotFoundError(
        f"{path!r} is not a zarrckpt checkpoint (it has no zarrckpt {ROOT_METADATA!r} and no "
        f"{COMMIT_MARKER!r}): it {text}"
    )


def missing_path_error(path: str) -> ZarrCkptError:
    """The error for a path that does not exist; it names the staging
    directory of a save to it that did not finish (or is still running)."""
    parent, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}{STAGING_INFIX}"
    try:
        with os.scandir(parent) as it:
            staging = sorted(e.name for e in it if e.name.startswith(prefix))
    except OSError:
        staging = []
    if staging:
        return CheckpointNotFoundError(
            f"no checkpoint at {path!r}: a save to it did not finish or is still running "
            f"(its staging directory {os.path.join(parent, staging[0])!r} exists; delete it "
            "once no save is running)"
        )
    return CheckpointNotFoundError(f"no checkpoint at {path!r}")
