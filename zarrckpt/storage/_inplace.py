"""Checkpoints that share their directory with other files (the DCP plug-in).

``dcp.save`` with DCP's ``FileSystemWriter`` writes into an existing
directory and keeps the files already there (DCP's own ``torch_save_to_dcp``
writes the checkpoint next to its source file; trainers keep configs beside
checkpoints). :class:`~zarrckpt.ZarrStorageWriter` does the same. The
checkpoint is still committed as a whole: the commit marker is written last,
so a reader never loads a half-written checkpoint.

A checkpoint directory of its own is published with one atomic rename (see
:mod:`zarrckpt.storage._local`). A directory holding other files cannot be renamed
without moving them too, so the checkpoint is committed in place, by the
coordinator, once every rank has written into a staging directory inside it:

1. refuse if an entry of the new checkpoint would replace a file that is not
   part of the old checkpoint (nothing has changed yet);
2. remove the old commit marker: from here on the directory holds no
   loadable checkpoint;
3. remove the old checkpoint's entries, its root ``zarr.json`` last;
4. move the new root ``zarr.json`` in, then the new arrays;
5. write the commit marker (made durable with ``fsync``).

A crash before step 5 leaves the directory without a commit marker: never
loaded, its other files intact, and at every step the root ``zarr.json``
present names the leftover entries, which the next save into the directory
removes. Unlike a checkpoint directory of its own, replacing a checkpoint in
place is therefore not atomic: during steps 2-4 the directory holds neither
the old checkpoint nor the new one (never a mix of the two).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from typing import Any

from ..errors import CheckpointExistsError, CorruptCheckpointError
from ..format._json import loads_json
from ..format._marker import (
    COMMIT_GROUP,
    COMMIT_MARKER,
    FORMAT_NAME,
    LEGACY_COMMIT_MARKER,
    ROOT_METADATA,
)
from ._local import write_commit_marker
from ._paths import DCP_METADATA, STAGING_INFIX, few, make_parents
from ._posix import fsync_path as _fsync_path
from ._posix import remove_tree, write_json

__all__ = [
    "DCP_EXISTS",
    "has_commit_marker",
    "owned_entries",
    "foreign_entries",
    "choose_target",
    "check_collisions",
    "new_inner_staging_dir",
    "commit_in_place",
]

#: what DCP's FileSystemWriter says when ``overwrite=False`` meets a checkpoint
DCP_EXISTS = "Checkpoint already exists and self.overwrite=False."


def owned_entries(path: str) -> set[str]:
    """Names in ``path`` that belong to the zarrckpt checkpoint there (committed
    or not): the root ``zarr.json``, the commit marker and the top-level
    entry of every array the root metadata lists.

    Raises
    ------
    zarrckpt.errors.CorruptCheckpointError
        A commit marker is there but no readable zarrckpt root metadata, so
        the checkpoint's entries cannot be told from other files.
    """
    owned = {
        n
        for n in (ROOT_METADATA, COMMIT_GROUP, LEGACY_COMMIT_MARKER)
        if os.path.lexists(os.path.join(path, n))
    }
    committed = has_commit_marker(path)
    try:
        with open(os.path.join(path, ROOT_METADATA), "rb") as f:
            manifest = loads_json(f.read())["attributes"][FORMAT_NAME]
        for section in ("arrays", "pickled", "bytes"):
            for raw in manifest.get(section, {}).values():
                name = str(raw["path"]).split("/")[0]
                if name and not name.startswith("."):  # never "..", "" (absolute) or hidden
                    owned.add(name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        if committed:
            raise CorruptCheckpointError(
                f"checkpoint {path!r} has a commit marker but no readable zarrckpt root "
                f"metadata {ROOT_METADATA!r}, so its entries cannot be told apart from "
                "other files; remove the damaged checkpoint by hand"
            ) from None
        owned.discard(ROOT_METADATA)  # someone else's zarr.json
    return owned


def has_commit_marker(path: str) -> bool:
    """True when ``path`` holds a commit marker (of format version 2, or 1)."""
    return any(
        os.path.lexists(os.path.join(path, name)) for name in (COMMIT_MARKER, LEGACY_COMMIT_MARKER)
    )


def foreign_entries(path: str) -> list[str]:
    """Names in the directory ``path`` that are neither part of the zarrckpt
    checkpoint there nor zarrckpt staging directories."""
    owned = owned_entries(path)
    return sorted(
        n for n in os.listdir(path) if n not in owned and not n.startswith(STAGING_INFIX)
    )


def choose_target(path: str, *, overwrite: bool) -> str:
    """How the DCP plug-in writes at ``path``, checked before anything is written.

    Returns ``"new"`` (nothing there: staged beside, renamed into place),
    ``"replace"`` (a checkpoint directory holding nothing else, or a file,
    with ``overwrite``: replaced by one atomic rename) or ``"in place"`` (an
    existing directory holding other files, or an empty one).

    Like ``FileSystemWriter``, ``overwrite=False`` refuses only an existing
    checkpoint (a committed zarrckpt checkpoint, or DCP's ``.metadata``), with
    DCP's words; a zarrckpt checkpoint whose save never finished is replaced.

    Raises
    ------
    zarrckpt.errors.CheckpointExistsError
        A checkpoint exists and ``overwrite`` is False; ``path`` is a file and
        ``overwrite`` is False; ``path`` holds a DCP checkpoint (its files are
        never deleted, and ``dcp.load`` would keep reading them).
    """
    if not os.path.lexists(path):
        make_parents(path)
        return "new"
    if not os.path.isdir(path) or os.path.islink(path):
        if overwrite:
            return "replace"
        raise CheckpointExistsError(
            f"cannot write a checkpoint at {path!r}: it is a file or a symbolic link, not a "
            "directory; pass overwrite=True to replace it"
        )
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        if not overwrite:
            raise CheckpointExistsError(
                f"{DCP_EXISTS} zarrckpt: {path!r} holds a DCP checkpoint (FileSystemWriter's "
                f"{DCP_METADATA!r} and '*.distcp' files); choose another directory"
            )
        raise CheckpointExistsError(
            f"refusing to write a zarrckpt checkpoint into {path!r}: it holds a DCP "
            f"checkpoint (FileSystemWriter's {DCP_METADATA!r} and '*.distcp' files), which "
            "ZarrStorageWriter does not delete and dcp.load would go on reading; remove "
            "those files or choose another directory"
        )
    if has_commit_marker(path) and not overwrite:
        raise CheckpointExistsError(
            f"{DCP_EXISTS} zarrckpt: {path!r} already holds a committed zarrckpt checkpoint; "
            "pass ZarrStorageWriter(path, overwrite=True) to replace it"
        )
    owned = owned_entries(path)
    names = os.listdir(path)
    if owned and all(n in owned or n.startswith(STAGING_INFIX) for n in names):
        return "replace"
    return "in place"


def check_collisions(path: str, new: Iterable[str]) -> None:
    """Refuse when a top-level entry of the new checkpoint would replace a file
    of ``path`` that is not part of the checkpoint there.

    Raises
    ------
    zarrckpt.errors.CheckpointExistsError
        Such entries exist (named in the message).
    """
    owned = owned_entries(path)
    clash = sorted(
        n for n in set(new) if n not in owned and os.path.lexists(os.path.join(path, n))
    )
    if clash:
        raise CheckpointExistsError(
            f"cannot write the checkpoint into {path!r}: its entries {few(clash)} would "
            "replace files of that directory that are not part of a zarrckpt checkpoint "
            "(state-dict keys map to entries of the same name); rename or move those "
            "files, or choose another directory"
        )


def new_inner_staging_dir(path: str) -> str:
    """Create and return a fresh hidden staging directory inside ``path``."""
    staging = os.path.join(path, f"{STAGING_INFIX}{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    return staging


def commit_in_place(
    staging: str, path: str, root: dict[str, Any], checkpoint_id: str, *, fsync: bool
) -> None:
    """Write the root metadata into ``staging``, then commit its content into
    ``path`` (steps 1-5 of the module documentation) and remove ``staging``."""
    root_bytes = write_json(os.path.join(staging, ROOT_METADATA), root, fsync=fsync)
    new = sorted(os.listdir(staging))
    check_collisions(path, new)
    old = owned_entries(path)
    markers = {COMMIT_GROUP, LEGACY_COMMIT_MARKER} & old
    if markers:
        for name in (COMMIT_MARKER, LEGACY_COMMIT_MARKER):  # the marker files first
            if os.path.lexists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        if fsync:
            _fsync_path(path)
    for name in sorted(old - {ROOT_METADATA}):
        remove_tree(os.path.join(path, name))
    if ROOT_METADATA in old:
        os.remove(os.path.join(path, ROOT_METADATA))
    for name in [ROOT_METADATA] + [n for n in new if n != ROOT_METADATA]:
        os.rename(os.path.join(staging, name), os.path.join(path, name))
    if fsync:
        _fsync_path(path)
    write_commit_marker(path, root_bytes, checkpoint_id, fsync=fsync)
    os.rmdir(staging)
