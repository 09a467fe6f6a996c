"""One save to an object store in progress: :class:`ObjectStaging` (the write
side of :mod:`zarrckpt.storage._object`, whose docstring describes the commit
protocol). Objects are written directly at their final keys; nothing is visible
to readers until the commit marker is written last."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointExistsError, InvalidPathError
from ..format._marker import (
    COMMIT_GROUP,
    COMMIT_MARKER,
    FORMAT_NAME,
    FORMAT_VERSION,
    ROOT_METADATA,
    marker_document,
)
from ._base import Staging

if TYPE_CHECKING:
    from ._object import ObjectStore

__all__ = ["ObjectStaging", "SAVE_RECORD", "TOKEN_PREFIX", "MULTIPART_BYTES", "json_bytes"]

#: written by the coordinator when a save starts, deleted after its commit
SAVE_RECORD = COMMIT_GROUP + "/saving.json"
#: staging tokens of object stores: ``zarrckpt-object:<save id>``
TOKEN_PREFIX = "zarrckpt-object:"
#: objects at least this large are uploaded in parts (``chunk_size`` each, several at once)
MULTIPART_BYTES = 16 << 20
_PART_BYTES = 8 << 20
_PART_CONCURRENCY = 4


def json_bytes(document: Any) -> bytes:
    """zarrckpt's JSON text of ``document``."""
    return json.dumps(document, indent=2, sort_keys=False).encode() + b"\n"


@dataclass
class ObjectStaging(Staging):
    """A save writing directly below its store's prefix (invisible until the marker)."""

    requests_per_thread = 8

    store: ObjectStore
    save_id: str
    _local: list[str] = field(default_factory=list, repr=False)

    @property
    def token(self) -> str:
        return TOKEN_PREFIX + self.save_id

    @property
    def local_dir(self) -> str:
        """A local temporary directory, uploaded by :meth:`publish` / :meth:`publish_file`."""
        if not self._local:
            import tempfile

            self._local.append(tempfile.mkdtemp(prefix="zarrckpt-upload-"))
        return self._local[0]

    def ensure_dir(self, key: str) -> None:
        """Nothing to do: object stores have no directories."""

    def _put(self, key: str, data: Any, *, create: bool = False) -> None:
        """PUT ``data`` (a buffer, a list of buffers or a local file) at ``key``: in
        parts when large (a list always: its buffers are streamed into the parts,
        never joined); with ``create`` only if no object is there (else
        ``AlreadyExistsError``)."""
        import obstore

        store = self.store
        if isinstance(data, str):
            data = Path(data)
        multipart = isinstance(data, (Path, list)) or memoryview(data).nbytes >= MULTIPART_BYTES
        store.call(
            "PUT",
            key,
            lambda: obstore.put(
                store.client,
                store.full_key(key),
                data,
                mode="create" if create else "overwrite",
                use_multipart=multipart,
                chunk_size=_PART_BYTES,
                max_concurrency=_PART_CONCURRENCY,
            ),
        )

    def write_small(self, key: str, data: bytes) -> None:
        self._put(key, data)

    def write_chunk(self, key: str, buffers: list[Any], *, writeback: bool = False) -> int:
        views = [memoryview(b).cast("B") for b in buffers]
        nbytes = sum(v.nbytes for v in views)
        if len(views) > 1 and nbytes >= MULTIPART_BYTES:
            # a large piece (shard index, inner chunks and their crc32c) goes up in
            # parts filled from its buffers: no copy of the whole piece in memory
            self._put(key, views)
        else:
            self._put(key, views[0] if len(views) == 1 else b"".join(views))
        return nbytes

    def write_chunk_at(
        self, key: str, offset: int, buffers: list[Any], *, writeback: bool = False
    ) -> int:
        raise InvalidPathError(
            f"cannot write at offset {offset} of {self.store.location(key)!r}: objects are "
            "written whole (ObjectStore.shared_files is False, so writers write one object "
            "per chunk piece)"
        )

    def write_json(self, key: str, document: Any, *, fsync: bool = False) -> bytes:
        data = json_bytes(document)
        self._put(key, data)
        return data

    def read_small(self, key: str) -> bytes:
        return self.store.read_small(key)

    def sync(self) -> None:
        """Nothing to do: a PUT returns once the object is stored."""

    def _still_ours(self) -> None:
        try:
            record = json.loads(self.store.read_small(SAVE_RECORD))
        except (FileNotFoundError, ValueError):
            record = {}
        if record.get("save_id") != self.save_id:
            raise CheckpointExistsError(
                f"checkpoint path {self.store.path!r}: another save to it started while this "
                "one was writing and removed its objects; nothing was committed"
            )

    def commit(
        self, root: dict[str, Any], checkpoint_id: str, *, overwrite: bool, fsync: bool
    ) -> None:
        """Write the root ``zarr.json``, then the commit marker, then drop the save record."""
        import obstore.exceptions as oe

        self._still_ours()
        root_bytes = self.write_json(ROOT_METADATA, root)
        version = root["attributes"][FORMAT_NAME].get("format_version", FORMAT_VERSION)
        marker = json_bytes(marker_document(root_bytes, checkpoint_id, version))
        try:
            self._put(COMMIT_MARKER, marker, create=not overwrite)
        except oe.AlreadyExistsError:
            raise CheckpointExistsError(
                f"checkpoint path {self.store.path!r} already exists: another save committed "
                "there while this one was being written (overwrite=False)"
            ) from None
        try:
            self._still_ours()
        except CheckpointExistsError:
            # a save that started meanwhile owns the prefix and clears it: this
            # checkpoint may be deleted any moment, so it is not reported as saved
            raise CheckpointExistsError(
                f"checkpoint path {self.store.path!r}: another save to it started while "
                "this one was committing and replaces it; this save is not committed"
            ) from None
        self.store._delete([SAVE_RECORD])

    def release(self) -> None:
        """Delete this save's record if it is still the prefix's (nothing else)."""
        try:
            self._still_ours()
        except CheckpointExistsError:
            return
        self.store._delete([SAVE_RECORD])

    def publish(self, *, overwrite: bool, fsync: bool) -> None:
        """Upload the local directory's files below the prefix."""
        root = self.local_dir
        for directory, _dirs, files in os.walk(root):
            for name in files:
                rel = os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/")
                self._put(rel, os.path.join(directory, name))
        self.store._delete([SAVE_RECORD])
        self._drop_local()

    def publish_file(
        self, name: str, *, overwrite: bool, fsync: bool, synced: bool = False
    ) -> None:
        """Upload the local file ``name`` as the object at the URL itself."""
        store = self.store
        store._delete([SAVE_RECORD])
        if not overwrite and store.kind() != "missing":
            raise CheckpointExistsError(f"{store.path!r} already exists")
        self._put("", os.path.join(self.local_dir, name))
        self._drop_local()

    def _drop_local(self) -> None:
        if self._local:
            import shutil

            shutil.rmtree(self._local.pop(), ignore_errors=True)

    def abort(self) -> None:
        """Delete what this save wrote (everything below the prefix while its save
        record is still there; nothing once another save took the prefix over)."""
        self._drop_local()
        try:
            self._still_ours()
        except CheckpointExistsError:
            return
        store = self.store
        store._delete([k for k in store.object_keys() if k != SAVE_RECORD] + [SAVE_RECORD])
