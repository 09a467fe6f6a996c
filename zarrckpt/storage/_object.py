"""Checkpoints on object stores (S3, Azure Blob, in-memory): :class:`ObjectStore`.

Objects cannot be renamed or written by several ranks together, so a save
writes every object directly at its final key below the checkpoint prefix,
one object per chunk piece (:attr:`ObjectStore.shared_files` is False), and
the commit is the order of writes (docs/object-storage.md, "Commit protocol"):

1. the coordinator's :meth:`ObjectStore.stage` deletes the commit marker
   first (``overwrite=True``; from then on the prefix holds no loadable
   checkpoint), then every other object below the prefix (the old
   checkpoint, or the leftovers of a save that died), and writes the save
   record ``~commit/saving.json``;
2. every rank writes its objects (plain PUTs, multipart above
   :data:`MULTIPART_BYTES`, as many at once as the writer has threads);
3. :meth:`ObjectStaging.commit` checks that its save record is still there
   (no other save took the prefix over), writes the root ``zarr.json``, then
   the commit marker ``~commit/zarr.json`` (a conditional create when not
   overwriting), then deletes the save record.

A reader GETs the marker and the root (:meth:`ObjectStore.read_committed_root`):
a save that died before step 3 is invisible. Requests are retried by the
client (:mod:`zarrckpt.storage._object_config`); a request that still fails
raises :class:`~zarrckpt.errors.ObjectStoreError` naming the key.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidPathError,
    ObjectStoreError,
)
from ..format._marker import (
    COMMIT_GROUP,
    COMMIT_MARKER,
    FORMAT_NAME,
    ROOT_METADATA,
    check_marker,
    check_root,
)
from ._base import Kind, RangeReader, Store
from ._object_config import ObjectPath, build_client, parse_url
from ._object_staging import SAVE_RECORD, TOKEN_PREFIX, ObjectStaging, json_bytes
from ._paths import few

__all__ = ["ObjectStore", "ObjectStaging", "ObjectRangeReader"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class ObjectStore(Store):
    """A checkpoint below a prefix of an object store (``s3://bucket/prefix``,
    ``az://container/prefix``, ``memory://name/prefix``).

    Parameters
    ----------
    path
        The URL.
    storage_options
        Client options (endpoint, region, credentials, retries):
        :func:`~zarrckpt.storage._object_config.build_client`.
    """

    path: str
    storage_options: dict[str, Any] | None = None
    _client: list[Any] = field(default_factory=list, compare=False, repr=False)

    #: ranks cannot write one object together: one object per chunk piece
    shared_files = False
    requests_per_thread = 8

    def __post_init__(self) -> None:
        # the path carries the options to whoever opens a store from it again
        if not isinstance(self.path, ObjectPath) or self.storage_options is not None:
            object.__setattr__(self, "path", ObjectPath(self.path, self.storage_options))

    def __reduce__(self) -> tuple[Any, ...]:  # the client is rebuilt where unpickled
        return (type(self), (self.path, self.storage_options))

    def zarr_store(self) -> Any:
        """A read-only zarr-python store rooted at the checkpoint (``zarr.storage.ObjectStore``)."""
        from ._object_zarr import zarr_object_store

        return zarr_object_store(self.path, self.storage_options)

    # ------------------------------------------------------------------ client

    @property
    def client(self) -> Any:
        if not self._client:
            self._client.append(build_client(self.path, self.storage_options))
        return self._client[0]

    @property
    def prefix(self) -> str:
        return parse_url(self.path)[2]

    def full_key(self, key: str) -> str:
        """The object key of ``key`` (relative to the checkpoint) in the bucket."""
        prefix = self.prefix
        if not key:
            return prefix
        return f"{prefix}/{key}" if prefix else key

    def call(self, what: str, key: str, fn: Callable[[], _T]) -> _T:
        """``fn()`` (an obstore request about ``key``), its failures as zarrckpt errors:
        a missing object stays a :class:`FileNotFoundError`."""
        import obstore.exceptions as oe

        try:
            return fn()
        except FileNotFoundError:
            raise
        except oe.AlreadyExistsError:
            raise
        except (oe.BaseError, OSError, RuntimeError, TimeoutError) as e:
            first = str(e).split("\n", 1)[0]
            raise ObjectStoreError(
                f"object store request failed: {what} of {key!r} at {self.location(key)!r} "
                f"({type(e).__name__}: {first}); transient failures (5xx, throttling, "
                "timeouts, dropped connections) were retried until the retry bound "
                "(storage_options max_retries / retry_timeout) ran out, client errors "
                "(4xx: credentials, permissions, no such bucket) are not retried"
            ) from None

    def _list(self, key: str) -> Iterator[Any]:
        """Every object below the prefix ``key`` (recursive)."""
        import obstore

        base = self.full_key(key)
        stream = self.call(
            "list", key, lambda: obstore.list(self.client, f"{base}/" if base else None)
        )
        while True:
            batch = self.call("list", key, lambda: next(stream, None))
            if batch is None:
                return
            yield from batch

    def list_objects(self, key: str = "") -> list[dict[str, Any]]:
        """obstore's metadata (``path`` from the bucket, ``size``, ``e_tag``...) of
        every object below the prefix ``key``."""
        return list(self._list(key))

    def object_keys(self, key: str = "") -> list[str]:
        """Every object key below the prefix ``key``, relative to the checkpoint."""
        skip = len(self.full_key("")) + 1 if self.prefix else 0
        return sorted(o["path"][skip:] for o in self._list(key))

    def _head(self, key: str) -> Any:
        import obstore

        try:
            return self.call("HEAD", key, lambda: obstore.head(self.client, self.full_key(key)))
        except FileNotFoundError:
            return None

    def _is_prefix(self, key: str) -> bool:
        return next(iter(self._list(key)), None) is not None

    # ------------------------------------------------------------------ probing

    def kind(self, key: str = "") -> Kind:
        if key and self._head(key) is not None:
            return "file"
        if self._is_prefix(key):
            return "dir"
        if not key and self.prefix and self._head(key) is not None:
            return "file"  # the URL names one object (a safetensors file, ...)
        return "missing"

    def exists(self, key: str) -> bool:
        return self.kind(key) != "missing"

    def size(self, key: str) -> int:
        meta = self._head(key)
        if meta is None:
            raise FileNotFoundError(f"no object {self.location(key)!r}")
        return int(meta["size"])

    def list_dir(self, key: str = "") -> list[str]:
        import obstore

        base = self.full_key(key)
        listed = self.call(
            "list",
            key,
            lambda: obstore.list_with_delimiter(self.client, f"{base}/" if base else None),
        )
        skip = len(base) + 1 if base else 0
        names = [p[skip:] for p in listed["common_prefixes"]]
        names += [o["path"][skip:] for o in listed["objects"]]
        return sorted(n.rstrip("/") for n in names if n)

    def location(self, key: str = "") -> str:
        return f"{self.path.rstrip('/')}/{key}" if key else self.path

    # ------------------------------------------------------------------ reading

    def read_small(self, key: str) -> bytes:
        import obstore

        def get() -> bytes:
            return bytes(obstore.get(self.client, self.full_key(key)).bytes())

        return self.call("GET", key, get)

    def open_reader(self, key: str) -> ObjectRangeReader:
        return ObjectRangeReader(self, key)

    def missing_error(self) -> Exception:
        return CheckpointNotFoundError(f"no checkpoint at {self.path!r} (no object below it)")

    def read_committed_root(self) -> dict[str, Any]:
        """The GETs of the marker and of the root, sent together (one round trip;
        more requests only to explain a failure). The marker binds the root it
        commits (:func:`check_root`), so a root read while another save replaces
        it is refused, whichever of the two replies came first."""
        root: list[bytes | BaseException] = []

        def get_root() -> None:
            try:
                root.append(self.read_small(ROOT_METADATA))
            except BaseException as e:  # handed to the caller below
                root.append(e)

        fetch = threading.Thread(target=get_root, name="zarrckpt-root", daemon=True)
        fetch.start()
        try:
            raw = self.read_small(COMMIT_MARKER)
        except FileNotFoundError:
            raise self._why_not_committed() from None
        finally:
            fetch.join()
        marker = check_marker(self.path, COMMIT_MARKER, raw)
        root_bytes = root[0]
        if isinstance(root_bytes, FileNotFoundError):
            raise IncompleteCheckpointError(
                f"checkpoint {self.path!r}: its commit marker exists but the root "
                f"{ROOT_METADATA!r} is missing (deleted, or an overwrite is under way)"
            ) from None
        if isinstance(root_bytes, BaseException):
            raise root_bytes
        return check_root(self.path, root_bytes, marker)

    def _why_not_committed(self) -> Exception:
        kind = self.kind()
        if kind == "missing":
            return self.missing_error()
        if kind == "file":
            return CheckpointNotFoundError(
                f"{self.path!r} is an object, not a zarrckpt checkpoint prefix "
                "(use zarrckpt.convert for torch.save or safetensors files)"
            )
        if self.looks_like_checkpoint():
            return IncompleteCheckpointError(
                f"checkpoint {self.path!r} is incomplete: its commit marker {COMMIT_MARKER!r} "
                "is missing (a save to it did not finish, is still running, or is "
                "overwriting it); the next save to it removes the leftovers"
            )
        names = self.list_dir()
        return CheckpointNotFoundError(
            f"{self.path!r} is not a zarrckpt checkpoint (no {COMMIT_MARKER!r}): it holds "
            f"{few(names)}"
        )

    def check_entries(self, key: str) -> None:
        """Nothing to check: object stores hold only objects (no links, devices, FIFOs)."""

    def looks_like_checkpoint(self) -> bool:
        if self._is_prefix(COMMIT_GROUP):
            return True
        return super().looks_like_checkpoint()

    def staging_owner(self, name: str) -> str | None:
        """None: object-store saves write in place below their own prefix (a killed
        save leaves that prefix without commit marker), never into a sibling staging."""
        return None

    def leftovers(self) -> list[str]:
        """Keys below the prefix that belong to no committed checkpoint: every key
        when there is none (a save died or runs), else those outside the manifest's
        arrays and their groups (a save record, stray objects)."""
        keys = self.object_keys()
        try:
            root = self.read_committed_root()
        except (IncompleteCheckpointError, CheckpointNotFoundError):
            return keys
        manifest = root.get("attributes", {}).get(FORMAT_NAME, {})
        arrays = [
            rec["path"]
            for part in ("arrays", "pickled", "bytes")
            for rec in manifest.get(part, {}).values()
        ]
        groups = {"/".join(a.split("/")[:i]) for a in arrays for i in range(1, a.count("/") + 1)}
        allowed = {ROOT_METADATA, COMMIT_MARKER} | {f"{g}/zarr.json" for g in groups}
        return [
            k for k in keys if k not in allowed and not any(k.startswith(a + "/") for a in arrays)
        ]

    # ------------------------------------------------------------------ writing

    def check_writable(self, *, overwrite: bool) -> None:
        """Refuse a prefix holding a committed checkpoint (unless ``overwrite``) or
        objects that are not zarrckpt's; leftovers of a dead save are fine."""
        names = self.list_dir()
        if not names:
            return
        if not self.looks_like_checkpoint():
            raise CheckpointExistsError(
                f"refusing to save to {self.path!r}: it holds {few(names)}, not a zarrckpt "
                "checkpoint; a save deletes everything below its prefix, so choose a new "
                f"prefix such as {self.location('checkpoint')!r}"
            )
        if not self.exists(COMMIT_MARKER):
            return  # the leftovers of a save that died: removed by the next save
        if not overwrite:
            raise CheckpointExistsError(
                f"checkpoint path {self.path!r} already exists; pass overwrite=True to replace "
                "it (on object stores the old checkpoint is deleted before the new one is "
                "written: docs/object-storage.md)"
            )
        try:
            foreign = [k for k in self.leftovers() if k != SAVE_RECORD]
        except CorruptCheckpointError as e:
            raise CheckpointExistsError(
                f"refusing to overwrite {self.path!r}: its committed checkpoint is damaged "
                f"({e}), so which objects belong to it cannot be told; delete the prefix "
                "yourself if nothing else is below it, or save to another prefix"
            ) from None
        if foreign:
            raise CheckpointExistsError(
                f"refusing to overwrite checkpoint {self.path!r}: besides the checkpoint it "
                f"holds {few(foreign)}, which replacing the checkpoint would delete (a save "
                "clears its prefix); move them elsewhere or save to another prefix"
            )

    def _delete(self, keys: list[str]) -> None:
        import obstore

        for i in range(0, len(keys), 1000):
            batch = [self.full_key(k) for k in keys[i : i + 1000]]
            self.call("DELETE", keys[i], functools.partial(obstore.delete, self.client, batch))

    def stage(self, *, overwrite: bool = False) -> ObjectStaging:
        """Claim the prefix with this save's record, then clear it (the marker first).

        The record is written before anything is deleted, and without
        ``overwrite`` the marker is checked again after it: a save that committed
        since :meth:`check_writable` is then never deleted; and one that commits
        later finds the record replaced (:meth:`ObjectStaging.commit` checks it
        after writing its marker) and raises instead of reporting a checkpoint
        this save is about to delete.
        """
        staging = ObjectStaging(self, uuid.uuid4().hex)
        staging.write_small(SAVE_RECORD, json_bytes({"save_id": staging.save_id}))
        if self.exists(COMMIT_MARKER):
            if not overwrite:
                staging.release()
                raise CheckpointExistsError(
                    f"checkpoint path {self.path!r} already exists: another save committed "
                    "there just before this one started (overwrite=False); nothing was written"
                )
            self._delete([COMMIT_MARKER])
        self._delete([k for k in self.object_keys() if k != SAVE_RECORD])
        return staging

    def attach(self, token: str, *, rank: int = 0) -> ObjectStaging:
        if not token.startswith(TOKEN_PREFIX):
            raise InvalidPathError(
                f"{token!r} is not a staging token of object-store checkpoint {self.path!r} "
                f"(expected {TOKEN_PREFIX}<save id>)"
            )
        return ObjectStaging(self, token[len(TOKEN_PREFIX) :])

    def remove(self) -> None:
        if self.exists(COMMIT_MARKER):
            self._delete([COMMIT_MARKER])
        self._delete(self.object_keys())
        if self.prefix and self._head("") is not None:
            self._delete([""])


class ObjectRangeReader(RangeReader):
    """One object read by ranged GETs (its size by one HEAD, when asked; known
    without one after a GET). Every GET after the first asks for the version the
    first one returned (``If-Match`` with its ETag): bytes of two versions of an
    object replaced meanwhile are never combined (:class:`IncompleteCheckpointError`)."""

    #: consecutive ranges (inner chunks stored back to back) coalesced into GETs
    #: of up to this many bytes: a round trip per 16 MiB rather than per 1 MiB
    read_group_bytes = 16 << 20

    def __init__(self, store: ObjectStore, key: str) -> None:
        self._store, self._key = store, key
        self._size: int | None = None
        self._e_tag: str | None = None

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = self._store.size(self._key)
        return self._size

    @property
    def e_tag(self) -> str | None:
        """The ETag of the version read (None before the first GET, or if the store
        gives none)."""
        return self._e_tag

    def readv_into(self, buffers: list[memoryview], offset: int) -> int:
        import obstore

        want = sum(len(b) for b in buffers)
        if want == 0 or (self._size is not None and offset >= self._size):
            return 0
        import obstore.exceptions as oe

        store, key, e_tag = self._store, self._key, self._e_tag
        options: Any = {"range": (offset, offset + want)}  # obstore GetOptions
        if e_tag is not None:
            options["if_match"] = e_tag

        def get() -> tuple[int, Any, Any] | None:
            try:
                result = obstore.get(store.client, store.full_key(key), options=options)
            except oe.PreconditionError:
                return None
            # the body is read here too: a connection lost while it arrives is
            # translated (and named) like any other failure of the request
            return int(result.meta["size"]), result.meta.get("e_tag"), result.bytes()

        try:
            got_back = store.call("GET", key, get)
        except FileNotFoundError:
            if e_tag is None:
                raise
            got_back = None  # some stores answer a failed If-Match with 404
        except ObjectStoreError as e:
            # a range starting at or beyond the end is refused (416): then the
            # object is shorter than asked, which the caller reports; any other
            # failure is raised as it is
            try:
                if self._size is None:
                    self._size = store.size(key)
            except Exception:
                raise e from None
            if offset >= self._size:
                return 0
            raise
        if got_back is None:
            raise IncompleteCheckpointError(
                f"{store.location(key)!r} was replaced or deleted while it was being read "
                "(another save or upload is writing there); try again once it is done"
            )
        size, self._e_tag, body = got_back
        self._size = size
        data = memoryview(body)
        got = 0
        for buf in buffers:
            n = min(len(buf), len(data) - got)
            if n <= 0:
                break
            buf[:n] = data[got : got + n]
            got += n
        return got

    def close(self) -> None:
        pass
