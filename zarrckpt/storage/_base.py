"""The storage interface: where a checkpoint's bytes are read from and written to.

Every reader and writer of zarrckpt checkpoints (save, load, open, verify,
stats, diff) reaches the bytes through these three classes; only the
implementations (today :mod:`zarrckpt.storage._local`, a local or shared POSIX
filesystem) touch files. An object-store backend implements the same methods.

* :class:`Store` is one checkpoint location (zarr-python's ``zarr.abc.store``
  where it fits): keys are ``/``-separated and relative to the location, reads
  fill caller buffers at byte offsets (:class:`RangeReader`) so chunk data goes
  straight into tensor memory, small objects (metadata documents) are read
  whole. It is a picklable value: dask tasks and DCP plans carry it.
* :class:`Staging` is one save in progress (DCP's ``StorageWriter``
  lifecycle): the coordinator checks the location (:meth:`Store.check_writable`)
  and creates it (:meth:`Store.stage`), every rank attaches to it by its
  :attr:`Staging.token` (:meth:`Store.attach`) and writes chunks (gathered
  buffers, no copy) and small objects, makes them durable (:meth:`Staging.sync`),
  and the coordinator commits it (:meth:`Staging.commit`: root metadata, commit
  marker last, then the location shows the new checkpoint at once) or
  abandons it (:meth:`Staging.abort`). Nothing of a staging is visible at the
  location before the commit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from ..format._json import loads_json
from ..format._marker import (
    COMMIT_MARKER,
    FORMAT_NAME,
    LEGACY_COMMIT_MARKER,
    ROOT_METADATA,
    check_marker,
    check_root,
)
from ._paths import STAGING_INFIX

__all__ = ["RangeReader", "Staging", "Store", "Kind"]

#: what a key names: nothing, an object (regular file), a prefix (directory), or
#: something else (a device, a FIFO, ...)
Kind = Literal["missing", "file", "dir", "other"]


class RangeReader(ABC):
    """One stored object open for positional reads (a chunk file).

    Use as a context manager, or call :meth:`close`.
    """

    #: bytes a reader of consecutive byte ranges asks for in one
    #: :meth:`readv_into` call: one ``preadv`` that stays in the CPU caches for
    #: the checksums after it (local files), or one ranged GET (object stores)
    read_group_bytes: ClassVar[int] = 1 << 20

    @property
    @abstractmethod
    def size(self) -> int:
        """Size of the object in bytes."""

    @abstractmethod
    def readv_into(self, buffers: list[memoryview], offset: int) -> int:
        """Fill ``buffers`` in order with the bytes from ``offset`` on (``preadv``
        semantics): return the bytes read, which may be fewer than asked (the
        caller reads the rest), 0 at the end of the object. At most 512 buffers."""

    @abstractmethod
    def close(self) -> None:
        """Release the object (idempotent)."""

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Staging(ABC):
    """One save in progress: invisible at its store's location until
    :meth:`commit` (or :meth:`publish`)."""

    #: requests each I/O thread's share of the work keeps in flight: 1 where a
    #: request costs CPU and disk time (local files), more where it costs mostly
    #: a round trip (object stores): readers and writers then run
    #: ``threads * requests_per_thread`` requests at once, one small object each.
    requests_per_thread: ClassVar[int] = 1

    @property
    @abstractmethod
    def token(self) -> str:
        """Identifies the staging across processes (JSON-able): :meth:`Store.attach` takes it."""

    @property
    @abstractmethod
    def local_dir(self) -> str:
        """A real local directory for writers that need one (foreign formats written
        by other libraries); an object store uploads it at publish."""

    @abstractmethod
    def ensure_dir(self, key: str) -> None:
        """Make ``key`` usable as a prefix of later keys (a directory; no-op on object stores)."""

    @abstractmethod
    def write_small(self, key: str, data: bytes) -> None:
        """Write a small object (a metadata document) at ``key``."""

    @abstractmethod
    def write_chunk(self, key: str, buffers: list[Any], *, writeback: bool = False) -> int:
        """Write the concatenation of ``buffers`` (not copied) as the object ``key``;
        return the bytes written. ``writeback`` hints that the data will be made
        durable soon (the local store starts writing it back while writing)."""

    @abstractmethod
    def write_chunk_at(
        self, key: str, offset: int, buffers: list[Any], *, writeback: bool = False
    ) -> int:
        """Write the concatenation of ``buffers`` at byte ``offset`` of the file ``key``
        (created if missing, never truncated: several ranks write disjoint ranges of
        one shard file); return the bytes written. Only stores with
        :attr:`Store.shared_files` have it."""

    @abstractmethod
    def write_json(self, key: str, document: Any, *, fsync: bool = False) -> bytes:
        """Write ``document`` as zarrckpt's JSON text at ``key``; return the bytes written."""

    @abstractmethod
    def read_small(self, key: str) -> bytes:
        """Whole content of an object written into this staging."""

    @abstractmethod
    def sync(self) -> None:
        """Make everything written so far durable."""

    @abstractmethod
    def commit(
        self, root: dict[str, Any], checkpoint_id: str, *, overwrite: bool, fsync: bool
    ) -> None:
        """Write the root metadata and the commit marker (last), then show the
        checkpoint at the store's location, replacing the one there with ``overwrite``.

        Raises
        ------
        zarrckpt.errors.CheckpointExistsError
            Something appeared at the location meanwhile and ``overwrite`` is False.
        """

    @abstractmethod
    def publish(self, *, overwrite: bool, fsync: bool) -> None:
        """Show the staging's content at the location as it is (a directory of
        another format, e.g. a DCP checkpoint)."""

    @abstractmethod
    def publish_file(
        self, name: str, *, overwrite: bool, fsync: bool, synced: bool = False
    ) -> None:
        """Make the object ``name`` of the staging the location itself (a single
        file such as a ``torch.save`` archive), then remove the staging. With
        ``fsync`` the object is made durable first, unless ``synced`` says that
        its writer already did."""

    @abstractmethod
    def abort(self) -> None:
        """Remove the staging and everything written into it (idempotent)."""


class Store(ABC):
    """One checkpoint location (a local path or an object-store URL). Picklable."""

    #: the location as the user gave it (used in messages)
    path: str
    #: whether several ranks may write disjoint byte ranges of one file
    #: (:meth:`Staging.write_chunk_at`): POSIX storage. Saves then store each
    #: tensor as one shard file; otherwise (object stores) one object per piece.
    shared_files: ClassVar[bool] = True
    #: requests each I/O thread's share of the work keeps in flight: 1 where a
    #: request costs CPU and disk time (local files), more where it costs mostly
    #: a round trip (object stores): readers and writers then run
    #: ``threads * requests_per_thread`` requests at once, one small object each.
    requests_per_thread: ClassVar[int] = 1

    # ------------------------------------------------------------------ probing

    @abstractmethod
    def kind(self, key: str = "") -> Kind:
        """What ``key`` (``""``: the location itself) names."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True when something is stored at ``key`` (a dangling link counts)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of the object ``key``.

        Raises
        ------
        FileNotFoundError
            No object at ``key``.
        """

    @abstractmethod
    def list_dir(self, key: str = "") -> list[str]:
        """Names directly below the prefix ``key`` (sorted)."""

    @abstractmethod
    def location(self, key: str = "") -> str:
        """Where ``key`` is, as shown in messages (a path or a URL)."""

    # ------------------------------------------------------------------ reading

    @abstractmethod
    def read_small(self, key: str) -> bytes:
        """Whole content of a small object (a metadata document).

        Raises
        ------
        FileNotFoundError
            No object at ``key``.
        """

    @abstractmethod
    def open_reader(self, key: str) -> RangeReader:
        """Open the object ``key`` for positional reads.

        Raises
        ------
        FileNotFoundError
            No object at ``key``.
        """

    def missing_error(self) -> Exception:
        """The error for a location holding nothing."""
        return CheckpointNotFoundError(f"no checkpoint at {self.path!r}")

    def not_committed_error(self) -> Exception:
        """The error for a location holding no commit marker."""
        return IncompleteCheckpointError(
            f"checkpoint {self.path!r} is incomplete: its commit marker {COMMIT_MARKER!r} "
            "is missing"
        )

    def find_commit_marker(self) -> str:
        """Key of the commit marker: :data:`COMMIT_MARKER`, unless only a format
        version 1 marker exists. The result may not exist (an uncommitted checkpoint)."""
        if not self.exists(COMMIT_MARKER) and self.exists(LEGACY_COMMIT_MARKER):
            return LEGACY_COMMIT_MARKER
        return COMMIT_MARKER

    def read_committed_root(self) -> dict[str, Any]:
        """The root ``zarr.json`` of the committed checkpoint, after checking the marker.

        Raises
        ------
        CheckpointNotFoundError
            Nothing at the location, or no zarrckpt checkpoint (the message says
            what the location holds).
        IncompleteCheckpointError
            No commit marker (the save never finished) or a marker of another format.
        CorruptCheckpointError
            The root metadata is unreadable or does not match the marker's checksum.
        """
        kind = self.kind()
        if kind == "missing":
            raise self.missing_error()
        if kind != "dir":
            raise CheckpointNotFoundError(
                f"{self.path!r} is a file, not a zarrckpt checkpoint directory "
                "(use zarrckpt.convert for torch.save or safetensors files)"
            )
        name = self.find_commit_marker()
        try:
            raw = self.read_small(name)
        except FileNotFoundError:
            raise self.not_committed_error() from None
        marker = check_marker(self.path, name, raw)
        try:
            root_bytes = self.read_small(ROOT_METADATA)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}: root metadata {ROOT_METADATA!r} is missing"
            ) from None
        return check_root(self.path, root_bytes, marker)

    def looks_like_checkpoint(self) -> bool:
        """True when the location holds a zarrckpt checkpoint (committed or not)."""
        if any(self.kind(name) == "file" for name in (COMMIT_MARKER, LEGACY_COMMIT_MARKER)):
            return True
        try:
            root = loads_json(self.read_small(ROOT_METADATA))
            return FORMAT_NAME in root.get("attributes", {})
        except (OSError, ValueError, AttributeError):
            return False

    def staging_owner(self, name: str) -> str | None:
        """The entry whose save left ``name`` behind, when ``name`` (an entry directly
        below this location) is the staging of a save that never finished; else None.

        Locations nested below this one (a checkpoint manager's root holding step
        checkpoints) stage their saves here: the local store as the hidden sibling
        ``.<entry>.zarrckpt-tmp-<id>``.
        """
        if not name.startswith(".") or STAGING_INFIX not in name:
            return None
        owner = name[1 : name.index(STAGING_INFIX)]
        return owner or None

    def tree_size(self, key: str = "") -> int:
        """Total bytes of the objects at and below ``key`` (0 for nothing there)."""
        kind = self.kind(key)
        if kind == "file":
            return self.size(key)
        if kind != "dir":
            return 0
        total = 0
        for name in self.list_dir(key):
            total += self.tree_size(f"{key}/{name}" if key else name)
        return total

    def check_entries(self, key: str) -> None:
        """Refuse a prefix holding anything but objects and prefixes (for readers
        that open keys below ``key`` by path themselves, such as zarr-python's).

        Raises
        ------
        CorruptCheckpointError
            An entry below ``key`` is a symbolic link, a device, a FIFO, ...
        """
        for name in self.list_dir(key):
            sub = f"{key}/{name}" if key else name
            kind = self.kind(sub)
            if kind == "dir":
                self.check_entries(sub)
            elif kind != "file":
                raise CorruptCheckpointError(
                    f"checkpoint {self.path!r}: entry {sub!r} is not a regular file or "
                    "directory (a symbolic link, a device or a FIFO); a checkpoint holds only "
                    "regular files and directories"
                )

    @abstractmethod
    def zarr_store(self) -> Any:
        """A read-only zarr-python store rooted at the location (for plain zarr reads)."""

    def leftovers(self) -> list[str]:
        """Keys at the location that belong to no committed checkpoint (objects of
        a save that died). Local saves write into a separate staging directory, so
        a local checkpoint never has any."""
        return []

    # ------------------------------------------------------------------ writing

    @abstractmethod
    def check_writable(self, *, overwrite: bool) -> None:
        """Refuse to save over what is at the location unless allowed and safe
        (raises :class:`~zarrckpt.errors.CheckpointExistsError`); prepare a new one."""

    @abstractmethod
    def stage(self, *, overwrite: bool = False) -> Staging:
        """Create a new staging for a save to this location (after
        :meth:`check_writable` with the same ``overwrite``; a store without rename
        checks again once the save has claimed the location, see
        :meth:`ObjectStore.stage <zarrckpt.storage._object.ObjectStore.stage>`)."""

    @abstractmethod
    def attach(self, token: str, *, rank: int = 0) -> Staging:
        """The staging ``token`` that another process created with :meth:`stage`
        (waits until this process can see it; ``rank`` is named in the error)."""

    def stale_stagings(self) -> list[str]:
        """Where the stagings of dead saves to this location are (locations as in
        messages; nothing by default). :meth:`stage` removes them; a staging of a
        save still running is never listed."""
        return []

    @abstractmethod
    def remove(self) -> None:
        """Delete whatever is at the location (nothing there is fine)."""
