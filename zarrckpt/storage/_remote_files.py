"""Foreign files on object stores: whole objects and DCP prefixes copied to and from
local files, for the converters.

torch.save files, safetensors files and DCP directories are memory-mapped,
written at byte offsets or written by libraries that take a local path, so
the converters work on local copies: a remote source is downloaded into a
private temporary directory first, a remote destination is written there and
uploaded afterwards (:mod:`zarrckpt.interop.convert._remote`). This module
does the transfers, with the client of :mod:`._object_config` and the error
translation of :meth:`~zarrckpt.storage._object.ObjectStore.call`:

* :func:`download` streams one object into a local file (chunk by chunk, never
  the whole object in memory); :func:`upload` sends a local file as one object
  (a multipart upload above :data:`PART_BYTES`, which S3 completes atomically:
  a failed upload leaves no object, or the old one intact);
* :func:`download_prefix` / :func:`upload_dir` copy a DCP directory, whose
  ``.metadata`` is its commit point: uploaded last, and deleted first when an
  old one is replaced.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    InvalidPathError,
)
from ._object import ObjectStore
from ._object_config import ObjectPath
from ._paths import DCP_METADATA, few

__all__ = [
    "CREATE_PUT_MAX",
    "PART_BYTES",
    "RemoteEntry",
    "check_dir_destination",
    "check_file_destination",
    "download",
    "download_prefix",
    "object_version",
    "probe",
    "read_head",
    "upload",
    "upload_dir",
]

#: part size of multipart uploads and the chunk size of streamed downloads
PART_BYTES = 8 << 20
#: files up to this size are uploaded with a conditional create (one PUT, held in
#: memory) when not overwriting; larger ones by a multipart upload after the check
CREATE_PUT_MAX = 64 << 20
#: parts of one multipart upload in flight at once
_CONCURRENCY = 8


def _store(url: str, storage_options: dict[str, Any] | None) -> ObjectStore:
    if storage_options is None and isinstance(url, ObjectPath):
        storage_options = url.storage_options
    return ObjectStore(str(url), storage_options)


@dataclass(frozen=True)
class RemoteEntry:
    """What a URL names: ``kind`` is ``"object"``, ``"prefix"`` (objects below it)
    or ``"missing"``; ``size`` is the object's size; ``dcp`` and ``zarrckpt`` say
    whether a prefix holds DCP's ``.metadata`` or a zarrckpt checkpoint."""

    kind: str
    size: int = 0
    dcp: bool = False
    zarrckpt: bool = False


def probe(url: str, storage_options: dict[str, Any] | None = None) -> RemoteEntry:
    """What ``url`` names (a LIST, plus a HEAD or two)."""
    store = _store(url, storage_options)
    if store.list_dir():
        return RemoteEntry(
            "prefix",
            dcp=store.exists(DCP_METADATA),
            zarrckpt=store.looks_like_checkpoint(),
        )
    if store.prefix and store.kind() == "file":
        return RemoteEntry("object", size=store.size(""))
    return RemoteEntry("missing")


def read_head(url: str, n: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """The first ``n`` bytes (fewer for a smaller object) of the object ``url``."""
    store = _store(url, storage_options)
    buf = bytearray(n)
    got = store.open_reader("").readv_into([memoryview(buf)], 0)
    return bytes(buf[:got])


def _missing(url: str, what: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(f"no {what} at {str(url)!r} (no such object)")


def object_version(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The ETag of the object ``url`` (None if the store gives none).

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        There is no object at ``url``.
    """
    store = _store(url, storage_options)
    meta = store._head("")
    if meta is None:
        raise _missing(url, "file")
    e_tag = meta.get("e_tag")
    return None if e_tag is None else str(e_tag)


def download(
    url: str,
    storage_options: dict[str, Any] | None,
    local_path: str,
    *,
    e_tag: str | None = None,
) -> int:
    """Stream the object ``url`` into the new local file ``local_path``; return its size.
    With ``e_tag``, only that version (:func:`object_version`) is downloaded.

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        There is no object at ``url``.
    zarrckpt.errors.ObjectStoreError
        A request failed (after the client's retries).
    """
    store = _store(url, storage_options)
    try:
        return _download_key(store, "", local_path, e_tag=e_tag)
    except FileNotFoundError:
        raise _missing(url, "file") from None


def _download_key(
    store: ObjectStore, key: str, local_path: str, *, e_tag: str | None = None
) -> int:
    """Stream ``key`` into the new file ``local_path``; with ``e_tag``, only that
    version of the object (else :class:`IncompleteCheckpointError`: it changed)."""
    import obstore
    import obstore.exceptions as oe

    full = store.full_key(key)

    def get() -> Any:
        try:
            return obstore.get(store.client, full, options={"if_match": e_tag} if e_tag else None)
        except oe.PreconditionError:
            return None

    result = store.call("GET", key, get)
    if result is None:
        raise IncompleteCheckpointError(
            f"{store.location(key)!r} was replaced or deleted while the objects below "
            f"{str(store.path)!r} were being downloaded (another save is writing there); "
            "try again once it is done"
        )
    stream = iter(result.stream(min_chunk_size=PART_BYTES))
    n = 0
    with open(local_path, "xb") as f:
        while True:
            chunk = store.call("GET", key, lambda: next(stream, None))
            if chunk is None:
                break
            f.write(memoryview(chunk))
            n += len(chunk)
    return n


def _upload_key(store: ObjectStore, local_path: str, key: str, *, create: bool) -> None:
    import obstore
    import obstore.exceptions as oe

    full = store.full_key(key)
    size = os.path.getsize(local_path)
    with open(local_path, "rb") as f:
        if create and size <= CREATE_PUT_MAX:
            # one conditional PUT: never replaces an object created meanwhile
            try:
                store.call("PUT", key, lambda: obstore.put(store.client, full, f, mode="create"))
            except oe.AlreadyExistsError:
                raise CheckpointExistsError(
                    f"{store.location(key)!r} was created by someone else while it was being "
                    "written; pass overwrite=True to replace it"
                ) from None
        else:
            if create and store.exists(key):
                # a multipart upload cannot be conditional: checked right before it
                raise CheckpointExistsError(
                    f"{store.location(key)!r} was created by someone else while it was being "
                    "written; pass overwrite=True to replace it"
                )
            store.call(
                "PUT",
                key,
                lambda: obstore.put(
                    store.client, full, f, chunk_size=PART_BYTES, max_concurrency=_CONCURRENCY
                ),
            )


def check_file_destination(
    url: str, storage_options: dict[str, Any] | None, *, overwrite: bool, what: str
) -> None:
    """Refuse ``url`` as the destination of the file ``what``: objects below it (it
    is a prefix, like a directory), or an existing object without ``overwrite``.

    Raises
    ------
    zarrckpt.errors.CheckpointExistsError
    """
    store = _store(url, storage_options)
    if not store.prefix:
        raise InvalidPathError(f"cannot write {what} {str(url)!r}: the URL names no object key")
    names = store.list_dir()
    if names:
        raise CheckpointExistsError(
            f"cannot write {what} {str(url)!r}: objects exist below it ({few(names)}); it is "
            "a prefix, like a directory"
        )
    if not overwrite and store.kind() == "file":
        raise CheckpointExistsError(
            f"{what} {str(url)!r} already exists; pass overwrite=True to replace it"
        )


def upload(
    local_path: str, url: str, storage_options: dict[str, Any] | None, *, overwrite: bool
) -> None:
    """Upload the local file ``local_path`` as the object ``url``.

    Up to :data:`CREATE_PUT_MAX` bytes without ``overwrite``: one conditional
    PUT, which fails rather than replace an object. Otherwise a multipart
    upload (parts of :data:`PART_BYTES` from the open file, a few in flight),
    which S3 makes visible only when it completes: a failed upload leaves the
    old object (or none). Call :func:`check_file_destination` first.

    Raises
    ------
    zarrckpt.errors.CheckpointExistsError
        ``overwrite`` is False and the object exists (created meanwhile).
    zarrckpt.errors.ObjectStoreError
        A request failed (after the client's retries).
    """
    _upload_key(_store(url, storage_options), local_path, "", create=not overwrite)


def _safe_relative(url: str, key: str) -> str:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\0" in key:
        raise InvalidPathError(
            f"object {key!r} below {str(url)!r} cannot be downloaded as a file (empty, '.' "
            "or '..' path components)"
        )
    return os.path.join(*parts)


def download_prefix(url: str, storage_options: dict[str, Any] | None, local_dir: str) -> int:
    """Download every object below the prefix ``url`` into the existing empty local
    directory ``local_dir`` (keys become relative paths); return the bytes copied.

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        No object below ``url``.
    """
    store = _store(url, storage_options)
    skip = len(store.full_key("")) + 1 if store.prefix else 0
    # each object is fetched in the version the listing saw (If-Match: its ETag), so
    # a directory replaced meanwhile is refused rather than mixed from two versions
    listed = sorted((o["path"][skip:], o.get("e_tag")) for o in store.list_objects())
    if not listed:
        raise CheckpointNotFoundError(f"no directory at {str(url)!r} (no object below it)")
    total = 0
    for key, e_tag in listed:
        path = os.path.join(local_dir, _safe_relative(url, key))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            total += _download_key(store, key, path, e_tag=e_tag)
        except FileNotFoundError:
            raise IncompleteCheckpointError(
                f"object {key!r} below {str(url)!r} was replaced or deleted while the "
                "directory was downloaded (another save is writing there); try again once "
                "it is done"
            ) from None
    return total


def check_dir_destination(
    url: str, storage_options: dict[str, Any] | None, *, overwrite: bool, what: str
) -> None:
    """Refuse the prefix ``url`` as the destination of the directory ``what``: an
    object at the URL itself, existing objects without ``overwrite``, or objects that
    are neither a DCP nor a zarrckpt checkpoint."""
    entry = probe(url, storage_options)
    if entry.kind == "missing":
        return
    if entry.kind == "object":
        raise CheckpointExistsError(f"cannot write {what} {str(url)!r}: it is an object")
    if not overwrite:
        raise CheckpointExistsError(
            f"{str(url)!r} already exists; pass overwrite=True to replace it"
        )
    if not (entry.dcp or entry.zarrckpt):
        names = _store(url, storage_options).list_dir()
        raise CheckpointExistsError(
            f"refusing to overwrite {str(url)!r}: it holds {few(names)}, neither a DCP nor "
            "a zarrckpt checkpoint"
        )


def upload_dir(
    local_dir: str,
    url: str,
    storage_options: dict[str, Any] | None,
    *,
    overwrite: bool,
    commit_name: str = DCP_METADATA,
) -> None:
    """Upload every file below ``local_dir`` to the prefix ``url``, ``commit_name``
    last. With ``overwrite``, what is below the prefix is deleted first (its
    ``commit_name`` or zarrckpt commit marker before anything else), so a reader
    sees no checkpoint there until ``commit_name`` is written. Without it every
    file is created only if no object is at its key (as :func:`upload`), so
    another writer's objects are never replaced. An upload that fails deletes
    the objects it created (the prefix is then as the check left it: empty, as
    without ``overwrite``, or cleared). Call :func:`check_dir_destination` first.
    """
    import obstore

    store = _store(url, storage_options)
    if overwrite:
        if store.exists(commit_name):
            full = store.full_key(commit_name)
            store.call("DELETE", commit_name, lambda: obstore.delete(store.client, full))
        store.remove()  # a zarrckpt checkpoint's marker first, then every object
    files: list[str] = []
    for root, _dirs, names in os.walk(local_dir):
        for name in names:
            files.append(os.path.relpath(os.path.join(root, name), local_dir))
    files.sort(key=lambda rel: (rel == commit_name, rel))
    written: list[str] = []
    try:
        for rel in files:
            key = rel.replace(os.sep, "/")
            _upload_key(store, os.path.join(local_dir, rel), key, create=not overwrite)
            written.append(key)
    except BaseException:
        with contextlib.suppress(Exception):  # the upload's own error is the one to see
            store._delete(written)
        raise
