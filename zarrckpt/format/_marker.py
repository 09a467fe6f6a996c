"""Names of the commit marker and the root metadata, and the format version.

Constants only (the on-disk format): :mod:`zarrckpt.storage._storage`, which
writes and reads the marker, re-exports them, and the format layer
(:mod:`zarrckpt.format._metadata`) uses them without importing the storage.
"""

from __future__ import annotations

__all__ = [
    "COMMIT_ATTRIBUTE",
    "COMMIT_GROUP",
    "COMMIT_MARKER",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LEGACY_COMMIT_MARKER",
    "ROOT_METADATA",
]

#: group holding the commit marker (``~`` never starts an encoded FQN at the root)
COMMIT_GROUP = "~commit"
#: the commit marker: relative path of the file, ``/``-separated (format version 2)
COMMIT_MARKER = COMMIT_GROUP + "/zarr.json"
#: the commit marker of format version 1 checkpoints, a plain JSON file at the root
LEGACY_COMMIT_MARKER = "zarrckpt.commit"
#: attribute of the ``~commit`` group holding the marker's members
COMMIT_ATTRIBUTE = "zarrckpt_commit"
ROOT_METADATA = "zarr.json"
FORMAT_NAME = "zarrckpt"
#: newest format version, the one written (older ones are read: docs/format.md, section 10)
FORMAT_VERSION = 2
