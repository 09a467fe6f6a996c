"""Where a :class:`~zarrckpt.interop.dcp.ZarrStorageWriter` save is staged, and the
JSON-able forms of the piece targets it hands to the ranks.

Local paths stage as DCP's ``FileSystemWriter`` would write (a staging directory
beside the path, or inside an existing directory holding other files:
:mod:`zarrckpt.storage._inplace`); object-store URLs stage through the store
(:meth:`~zarrckpt.storage._base.Store.stage` on the coordinator, clearing the
prefix; :meth:`~zarrckpt.storage._base.Store.attach` by token on every rank).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ...errors import CheckpointExistsError, ZarrCkptError
from ...format._marker import COMMIT_GROUP, ROOT_METADATA
from ...format._metadata import ArrayEntry
from ...format._shard import PieceTarget, StoredArray
from ...storage._base import Staging, Store
from ...storage._inplace import (
    DCP_EXISTS,
    check_collisions,
    choose_target,
    new_inner_staging_dir,
)
from ...storage._local import as_staging, is_object_url, open_store
from ...storage._paths import check_path, wait_visible

__all__ = [
    "open_staging",
    "attach_staging",
    "abort_quietly",
    "checked_path",
    "pieces_json",
    "target_json",
    "parse_target",
]


def open_staging(
    path: str, store: Store, entries: list[ArrayEntry], *, overwrite: bool
) -> tuple[str, str, Staging]:
    """Check ``path`` and create the staging of a new save (coordinator only):
    ``(mode, token, staging)``; ``mode`` is ``"object"`` for an object store, else
    what :func:`~zarrckpt.storage._inplace.choose_target` decided.

    Raises
    ------
    zarrckpt.errors.CheckpointExistsError
        With ``FileSystemWriter``'s words when a committed checkpoint is there
        and ``overwrite`` is False (or what the location holds cannot be replaced).
    """
    if is_object_url(path):
        try:
            store.check_writable(overwrite=overwrite)
        except CheckpointExistsError as e:
            raise CheckpointExistsError(f"{DCP_EXISTS} zarrckpt: {e}") from None
        try:
            staging = store.stage(overwrite=overwrite)
        except CheckpointExistsError as e:
            raise CheckpointExistsError(f"{DCP_EXISTS} zarrckpt: {e}") from None
        return "object", staging.token, staging
    mode = choose_target(path, overwrite=overwrite)
    if mode == "in place":
        names = {e.path.split("/")[0] for e in entries} | {ROOT_METADATA, COMMIT_GROUP}
        check_collisions(path, names)
        token = new_inner_staging_dir(path)
    else:
        token = store.stage().token
    return mode, token, as_staging(token)


def attach_staging(path: str, token: str, rank: int) -> Staging:
    """The staging the coordinator created for a save to ``path``, as seen by ``rank``."""
    if is_object_url(path):
        return open_store(path).attach(token, rank=rank)
    wait_visible(token, rank=rank)
    return as_staging(token)


def abort_quietly(staging: Staging) -> None:
    """Remove an abandoned staging; a failure (e.g. the object store is gone at
    interpreter exit) is logged, not raised (it runs from a finalizer)."""
    try:
        staging.abort()
    except (ZarrCkptError, OSError) as e:
        logging.getLogger("zarrckpt").warning(
            "could not remove the staging of an abandoned DCP save: %s", e
        )


def checked_path(path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> str:
    """``path`` checked, with ``storage_options`` when it is an object-store URL."""
    p = os.fspath(path)
    return check_path(p, storage_options=storage_options if is_object_url(p) else None)


def pieces_json(stored: StoredArray) -> list[Any]:
    """The piece grid's chunk and inner shapes, JSON-able."""
    inner = stored.pieces.inner_shape
    return [list(stored.pieces.chunk_shape), None if inner is None else list(inner)]


def target_json(stored: StoredArray, index: tuple[int, ...]) -> list[Any]:
    """Where piece ``index`` goes, as JSON-able values (see :func:`parse_target`)."""
    t = stored.target(index)
    return [t.key, list(t.chunk), t.offset, list(t.positions)]


def parse_target(raw: list[Any]) -> PieceTarget:
    """The :class:`~zarrckpt.format._shard.PieceTarget` of :func:`target_json`'s value."""
    key, chunk, offset, positions = raw
    return PieceTarget(key, tuple(chunk), offset, tuple(positions))
