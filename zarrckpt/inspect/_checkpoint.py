"""Read-only, single-process access to a checkpoint: ``zarrckpt.open``.

:class:`Checkpoint` gives the stored tensors as zarr arrays, dask arrays
(chunks = stored chunks) and torch tensors, and inspects a checkpoint without
loading it: :meth:`~Checkpoint.info`, :meth:`~Checkpoint.tree`,
:meth:`~Checkpoint.stats`, :meth:`~Checkpoint.diff`, :meth:`~Checkpoint.verify`.
The passes over the data run on the active dask scheduler (a
``dask.distributed`` client when one is the default, dask's threaded
scheduler otherwise), read each chunk once and hold only a few slabs of
about 8 MiB per worker. :func:`verify` also checks directories that cannot be
opened (uncommitted or damaged checkpoints).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptCheckpointError, MissingKeysError
from ..format._flatten import bytes_length, decode_plain
from ..format._metadata import ArrayEntry
from ..parallel._reader import CheckpointFiles, ReadRequest
from ..parallel._writer import default_threads
from ..storage._paths import check_path
from ._blocks import _ChunkSource
from ._diff import DiffReport, TensorDiff, compute_diff
from ._scan import Progress
from ._stats import TensorStats, compute_stats
from ._verify import Problem, VerifyReport, verify

if TYPE_CHECKING:  # torch is imported only where a tensor is produced
    import torch

__all__ = [
    "BytesInfo",
    "Checkpoint",
    "CheckpointInfo",
    "DiffReport",
    "PickledInfo",
    "Problem",
    "TensorDiff",
    "TensorInfo",
    "TensorStats",
    "VerifyReport",
    "open",
    "verify",
]


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor as it appears in :meth:`Checkpoint.tree` (no data read).

    Attributes
    ----------
    fqn, dtype, shape, chunks, nbytes
        Key, stored dtype name, global shape, chunk shape, size in bytes.
    """

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.fqn,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "nbytes": self.nbytes,
        }

    def __repr__(self) -> str:
        return f"TensorInfo({self.fqn!r}, {self.dtype}{list(self.shape)})"


@dataclass(frozen=True)
class PickledInfo:
    """A pickled object as it appears in :meth:`Checkpoint.tree` (never unpickled)."""

    fqn: str
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"pickle": self.fqn, "nbytes": self.nbytes}

    def __repr__(self) -> str:
        return f"PickledInfo({self.fqn!r}, {self.nbytes} bytes)"


@dataclass(frozen=True)
class BytesInfo:
    """A ``bytes`` / ``bytearray`` value as it appears in :meth:`Checkpoint.tree` (not read)."""

    nbytes: int
    type: str = "bytes"  # or "bytearray"

    def to_dict(self) -> dict[str, Any]:
        return {self.type: self.nbytes}

    def __repr__(self) -> str:
        return f"BytesInfo({self.type}, {self.nbytes} bytes)"


@dataclass(frozen=True)
class CheckpointInfo:
    """Summary of a checkpoint, from its metadata only (see :meth:`Checkpoint.info`).

    Attributes
    ----------
    path, checkpoint_id, format_version, created, zarrckpt_version, torch_version
        Identity and provenance (``created`` is an ISO 8601 UTC timestamp).
    world_size, mesh
        Number of ranks and device mesh of the save (``mesh`` is None when the
        save recorded none, e.g. single-process saves).
    tensors, total_bytes
        Number of stored tensors and their total size in bytes.
    dtypes
        Histogram ``{dtype: {"tensors": n, "bytes": b}}``, largest first.
    pickled, pickled_bytes
        Number and size of pickled objects.
    """

    path: str
    checkpoint_id: str | None
    format_version: int | None
    created: str | None
    zarrckpt_version: str | None
    torch_version: str | None
    world_size: int | None
    mesh: Any
    tensors: int
    total_bytes: int
    dtypes: dict[str, dict[str, int]] = field(default_factory=dict)
    pickled: int = 0
    pickled_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "checkpoint_id": self.checkpoint_id,
            "format_version": self.format_version,
            "created": self.created,
            "zarrckpt_version": self.zarrckpt_version,
            "torch_version": self.torch_version,
            "world_size": self.world_size,
            "mesh": self.mesh,
            "tensors": self.tensors,
            "total_bytes": self.total_bytes,
            "dtypes": {k: dict(v) for k, v in self.dtypes.items()},
            "pickled": self.pickled,
            "pickled_bytes": self.pickled_bytes,
        }


class Checkpoint:
    """A committed checkpoint opened read-only.

    Opening reads only the root metadata (one small file). Arrays are read on
    demand, every chunk verified against its crc32c.

    Parameters
    ----------
    path
        Checkpoint directory.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._files = CheckpointFiles(check_path(path))
        self.path = self._files.path

    # ------------------------------------------------------------------ mapping
    def keys(self) -> list[str]:
        """FQNs of the stored tensors, in state-dict order."""
        return list(self._files.arrays)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files.arrays)

    def __len__(self) -> int:
        return len(self._files.arrays)

    def __contains__(self, fqn: object) -> bool:
        return fqn in self._files.arrays

    def _entry(self, fqn: str) -> ArrayEntry:
        try:
            return self._files.arrays[fqn]
        except KeyError:
            raise MissingKeysError(
                f"checkpoint {self.path!r} has no tensor {fqn!r}", [fqn]
            ) from None

    def __getitem__(self, fqn: str) -> Any:
        """The stored array as a read-only ``zarr.Array`` (global shape, original dtype)."""
        import zarr

        from .._zarr_dtypes import register_zarr_dtypes
        from ._zarr_array import checked_array, checked_store

        register_zarr_dtypes()
        entry = self._entry(fqn)
        self._files.check_metadata(entry)
        # zarr-python opens the array's files by path: refuse links and FIFOs first
        self._files.store.check_entries(entry.path)
        store = checked_store(self.path)
        try:
            array = zarr.open_array(store, path=entry.path, mode="r")
        except Exception as e:  # zarr's own errors on a document it cannot use
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}: zarr cannot open array {fqn!r} at {entry.path!r}: {e}"
            ) from e
        return checked_array(array, self.path, fqn)

    # ------------------------------------------------------------------ reading
    def read(self, fqn: str) -> torch.Tensor:
        """Read a whole tensor (CPU, original dtype), checksums verified."""
        self._entry(fqn)
        return self._files.read_tensor(fqn, threads=default_threads())

    def to_dask(self, pattern: str | None = None) -> dict[str, Any]:
        """``{fqn: dask.array.Array}`` with dask chunks equal to the stored chunks.

        Parameters
        ----------
        pattern
            Optional glob (``fnmatch``) on FQNs, e.g. ``"layers.*.weight"``.

        Reads go through zarrckpt's reader (every chunk checksum verified) and
        work on any dask scheduler, including ``dask.distributed`` worker processes.
        """
        import dask.array as da

        out = {}
        for fqn in self.select(pattern):
            entry = self._files.arrays[fqn]
            out[fqn] = da.from_array(
                _ChunkSource(self._files.store, entry, self._files),
                chunks=entry.layout.chunk_shape if entry.shape else (),
                lock=False,
                asarray=False,
                name=f"zarrckpt-{self.metadata['checkpoint_id']}-{entry.path}",
                meta=np.empty((0,) * len(entry.shape), dtype=entry.dtype.numpy_dtype),
            )
        return out

    def state_dict(self, *, allow_pickle: bool = False) -> Any:
        """The whole nested state dict, tensors read into CPU memory."""
        requests: list[ReadRequest] = []

        def resolve(kind: str, fqn: str) -> Any:
            if kind == "pickle":
                return self._files.read_pickled(fqn, allow_pickle=allow_pickle)
            if kind == "bytes":
                return self._files.read_bytes(fqn)
            entry = self._files.arrays[fqn]
            from ..format._dtypes import numpy_as_tensor

            dest = np.empty(entry.shape, dtype=entry.dtype.numpy_dtype)
            requests.append(ReadRequest(entry, dest, (0,) * dest.ndim))
            return numpy_as_tensor(dest, entry.dtype.torch_dtype)

        result = decode_plain(self._files.tree, resolve)
        self._files.read_many(requests, threads=default_threads())
        return result

    # ---------------------------------------------------------------- inspection
    def select(self, pattern: str | None = None) -> list[str]:
        """FQNs matching a glob (``fnmatch``, case-sensitive; all when None), in order."""
        if pattern is None:
            return self.keys()
        return [k for k in self.keys() if fnmatch.fnmatchcase(k, pattern)]

    def info(self) -> CheckpointInfo:
        """Summary from the metadata alone: format, provenance, mesh, sizes, dtype histogram."""
        m = self.metadata
        dtypes: dict[str, dict[str, int]] = {}
        total = 0
        for entry in self._files.arrays.values():
            d = dtypes.setdefault(entry.dtype.zarr_name, {"tensors": 0, "bytes": 0})
            d["tensors"] += 1
            d["bytes"] += entry.nbytes
            total += entry.nbytes
        dtypes = dict(sorted(dtypes.items(), key=lambda kv: (-kv[1]["bytes"], kv[0])))
        return CheckpointInfo(
            path=self.path,
            checkpoint_id=m.get("checkpoint_id"),
            format_version=m.get("format_version"),
            created=m.get("created"),
            zarrckpt_version=m.get("zarrckpt_version"),
            torch_version=m.get("torch_version"),
            world_size=m.get("world_size"),
            mesh=m.get("mesh"),
            tensors=len(self._files.arrays),
            total_bytes=total,
            dtypes=dtypes,
            pickled=len(self._files.pickled),
            pickled_bytes=sum(e.nbytes for e in self._files.pickled.values()),
        )

    def tensor_info(self, fqn: str) -> TensorInfo:
        """Metadata of one stored tensor (no data read)."""
        entry = self._entry(fqn)
        return TensorInfo(
            fqn, entry.dtype.zarr_name, tuple(entry.shape), tuple(entry.layout.chunk_shape),
            entry.nbytes,
        )

    def tree(self) -> Any:
        """The nested state-dict structure, without reading any tensor.

        Containers are rebuilt as saved (dicts with their str/int keys, lists,
        tuples); tensors are :class:`TensorInfo`, pickled objects
        :class:`PickledInfo`, bytes values :class:`BytesInfo`, plain values
        themselves.
        """

        def resolve(kind: str, fqn: str) -> Any:
            if kind == "pickle":
                return PickledInfo(fqn, self._files.pickled[fqn].nbytes)
            return self.tensor_info(fqn)

        def on_bytes(node: dict[str, Any]) -> BytesInfo:
            def array_length(fqn: str) -> int:
                entry = self._files.byte_arrays.get(fqn)
                if entry is None:
                    raise CorruptCheckpointError(
                        f"checkpoint {self.path!r}: the tree refers to bytes value {fqn!r}, "
                        "which the manifest's 'bytes' section does not hold"
                    )
                return entry.nbytes

            body = node["bytes"]
            kind = "bytearray" if isinstance(body, dict) and body.get("bytearray") else "bytes"
            return BytesInfo(bytes_length(node, array_length), kind)

        return decode_plain(self._files.tree, resolve, on_bytes=on_bytes)

    def _entries(self, pattern: str | None) -> list[ArrayEntry]:
        entries = [self._files.arrays[k] for k in self.select(pattern)]
        for entry in entries:
            self._files.check_metadata(entry)
        return entries

    def stats(
        self, pattern: str | None = None, *, progress: Progress | None = None
    ) -> dict[str, TensorStats]:
        """Per-tensor statistics in one parallel pass over the stored chunks.

        For each tensor: element count, min, max, mean, population std
        (``ddof=0``), L2 norm, and the number of NaN, infinite and zero
        elements, equal to numpy's on the whole tensor up to float64 rounding
        (NaN propagates to min/max/mean/std/norm as in numpy). bfloat16 and
        float8 are upcast per slab; complex tensors report their magnitudes.

        Parameters
        ----------
        pattern
            Optional glob on FQNs.
        progress
            Optional ``progress(done_bytes, total_bytes)`` callback.

        Returns
        -------
        dict
            ``{fqn: TensorStats}`` in checkpoint order.

        Raises
        ------
        zarrckpt.errors.CorruptCheckpointError
            A chunk is missing or damaged (use :meth:`verify` to list every problem).
        """
        return compute_stats(self.path, self._entries(pattern), progress=progress)

    def histograms(
        self,
        pattern: str | None = None,
        *,
        bins: int = 100,
        ranges: dict[str, tuple[float, float]] | None = None,
        progress: Progress | None = None,
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Histograms of the finite values of each tensor, ``{fqn: (counts, edges)}``.

        Without ``ranges`` a first pass (:meth:`stats`) finds each tensor's
        range; tensors without a finite value are left out.
        """
        from ._stats import histograms

        entries = self._entries(pattern)
        if ranges is None:
            st = compute_stats(self.path, entries, progress=None)
            ranges = {}
            for fqn, s in st.items():
                lo, hi = s.min, s.max
                if s.nan or s.inf:  # range of the finite values needs a masked pass
                    lo, hi = _finite_range(self._files, self.path, self._files.arrays[fqn])
                if lo is not None and hi is not None:
                    ranges[fqn] = (float(lo), float(hi))
        entries = [e for e in entries if e.fqn in ranges]
        return histograms(self.path, entries, ranges, bins=bins, progress=progress)

    def diff(
        self,
        other: Checkpoint | str | os.PathLike[str],
        *,
        rtol: float = 0.0,
        atol: float = 0.0,
        progress: Progress | None = None,
    ) -> DiffReport:
        """Compare with another checkpoint (``self`` is ``a``, ``other`` is ``b``).

        Reports keys added and removed (tensors, plain values, pickled
        objects), shape, dtype and kind changes, changed plain values, and for
        every tensor present in both with the same shape the number of
        elements that are not close (``|a - b| <= atol + rtol * |b|``, NaN
        equal to NaN), the maximum absolute and relative difference. With the
        default ``rtol = atol = 0`` any changed element counts. One parallel
        pass over both checkpoints' chunks; the two may have different
        chunkings (different world sizes or meshes).
        """
        if not isinstance(other, Checkpoint):
            other = Checkpoint(other)
        return compute_diff(
            self.path,
            self.metadata,
            self._files.arrays,
            # pickled objects and large bytes values: uint8 arrays, FQNs disjoint
            {**self._files.pickled, **self._files.byte_arrays},
            other.path,
            other.metadata,
            other._files.arrays,
            {**other._files.pickled, **other._files.byte_arrays},
            rtol=rtol,
            atol=atol,
            progress=progress,
        )

    def verify(self, *, progress: Progress | None = None) -> VerifyReport:
        """Check every chunk (presence, size, checksums) and the metadata.

        Reports every problem rather than stopping at the first; see
        :func:`zarrckpt.inspect.verify`, which also works on checkpoints that
        cannot be opened.
        """
        return verify(self.path, progress=progress)

    # ------------------------------------------------------------------ metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """The manifest (format version, creation time, tree, arrays)."""
        return self._files.manifest

    def __repr__(self) -> str:
        return f"<zarrckpt.Checkpoint {self.path!r}: {len(self)} tensors>"


def _finite_range(files: CheckpointFiles, path: str, entry: ArrayEntry) -> tuple[Any, Any]:
    """(min, max) of the finite values of a tensor, or (None, None)."""
    from ._scan import plan_slabs, read_region
    from ._stats import _as_numeric

    lo = hi = None
    for slab in plan_slabs([entry]):
        v = _as_numeric(read_region(path, entry, slab.region)).reshape(-1)
        if v.dtype.kind == "c":
            v = np.abs(v)
        if v.dtype.kind == "f":
            v = v[np.isfinite(v)]
        if v.size:
            lo = v.min().item() if lo is None else min(lo, v.min().item())
            hi = v.max().item() if hi is None else max(hi, v.max().item())
    return lo, hi



def open(path: str | os.PathLike[str]) -> Checkpoint:  # noqa: A001 - public name is fixed
    """Open a committed checkpoint read-only (single process, no torch.distributed).

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError
    """
    return Checkpoint(path)
