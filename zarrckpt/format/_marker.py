"""The commit marker: its name, its document, and the checks a reader makes.

The on-disk format only (no I/O): the storage writes the document of
:func:`marker_document` last and reads the marker and the root metadata back
through :func:`check_marker` and :func:`check_root`.
"""

from __future__ import annotations

from typing import Any

from ..errors import CorruptCheckpointError, IncompleteCheckpointError
from ._codec import crc32c
from ._json import loads_json

__all__ = [
    "COMMIT_ATTRIBUTE",
    "COMMIT_GROUP",
    "COMMIT_MARKER",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LEGACY_COMMIT_MARKER",
    "ROOT_METADATA",
    "check_marker",
    "check_root",
    "marker_document",
    "marker_location_problem",
    "parse_commit_marker",
]

#: group holding the commit marker (``~`` never starts an encoded FQN at the root)
COMMIT_GROUP = "~commit"
#: the commit marker: relative path of the file, ``/``-separated (format versions 2 and 3)
COMMIT_MARKER = COMMIT_GROUP + "/zarr.json"
#: the commit marker of format version 1 checkpoints, a plain JSON file at the root
LEGACY_COMMIT_MARKER = "zarrckpt.commit"
#: attribute of the ``~commit`` group holding the marker's members
COMMIT_ATTRIBUTE = "zarrckpt_commit"
ROOT_METADATA = "zarr.json"
FORMAT_NAME = "zarrckpt"
#: newest format version, the one written (older ones are read: docs/format.md, section 10)
FORMAT_VERSION = 3


def marker_document(root_bytes: bytes, checkpoint_id: str, format_version: int) -> dict[str, Any]:
    """The commit marker written at :data:`COMMIT_MARKER`: a zarr group document
    holding the members in its attributes (``root_metadata_crc32c`` binds it to
    the root ``zarr.json`` written just before)."""
    marker = {
        "format": FORMAT_NAME,
        "format_version": format_version,
        "checkpoint_id": checkpoint_id,
        "root_metadata_crc32c": crc32c(root_bytes),
    }
    return {"zarr_format": 3, "node_type": "group", "attributes": {COMMIT_ATTRIBUTE: marker}}


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


def check_marker(path: str, name: str, raw: bytes) -> dict[str, Any]:
    """The members of the commit marker read at ``name`` (bytes ``raw``) of
    checkpoint ``path``, after checking that a reader may trust it.

    Raises
    ------
    IncompleteCheckpointError
        Not a zarrckpt commit marker.
    CorruptCheckpointError
        Not JSON, a format version newer than this zarrckpt, or at the wrong place.
    """
    try:
        document = loads_json(raw)
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
    return marker


def check_root(path: str, root_bytes: bytes, marker: dict[str, Any]) -> dict[str, Any]:
    """The root ``zarr.json`` document of checkpoint ``path`` from its bytes,
    after checking it against the commit ``marker`` (see :func:`check_marker`).

    Raises
    ------
    CorruptCheckpointError
        The bytes do not match the marker's crc32c, are no zarrckpt group
        document, or name another format version or checkpoint id.
    """
    version = marker["format_version"]
    if crc32c(root_bytes) != marker.get("root_metadata_crc32c"):
        raise CorruptCheckpointError(
            f"checkpoint {path!r}: root metadata {ROOT_METADATA!r} does not match the "
            "checksum recorded in the commit marker (damaged or modified after commit)"
        )
    try:
        root = loads_json(root_bytes)
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
