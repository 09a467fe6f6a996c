"""Open a committed checkpoint and read its arrays through its store
(:class:`~zarrckpt.storage._base.Store`)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..format._chunk_reader import ChunkReader
from ..format._dtypes import numpy_as_tensor
from ..format._json import loads_json
from ..format._marker import FORMAT_NAME
from ..format._metadata import ArrayEntry, check_array_document, parse_entry
from ..format._tree_check import check_tree
from ..storage._base import Store
from ..storage._local import open_store
from ._writer import array_json, parallel_map

if TYPE_CHECKING:  # torch is imported only where a tensor is produced
    import torch

__all__ = ["CheckpointFiles", "ReadRequest"]


@dataclass
class ReadRequest:
    """Fill ``dest`` (numpy view, placed at array element ``origin``) from array ``entry``."""

    entry: ArrayEntry
    dest: np.ndarray
    origin: tuple[int, ...]


class CheckpointFiles:
    """A committed checkpoint: manifest plus verified array reads.

    Parameters
    ----------
    path
        Checkpoint location, or its store.
    """

    def __init__(self, path: str | os.PathLike[str] | Store) -> None:
        self.store = open_store(path)
        self.path = self.store.path
        self.root = self.store.read_committed_root()
        self.manifest: dict[str, Any] = self.root["attributes"][FORMAT_NAME]
        version = self.manifest.get("format_version")
        try:
            self.tree: dict[str, Any] = self.manifest["tree"]
            self.arrays: dict[str, ArrayEntry] = {
                fqn: parse_entry(fqn, raw, checkpoint=self.path, format_version=version)
                for fqn, raw in self.manifest["arrays"].items()
            }
            self.pickled: dict[str, ArrayEntry] = {
                fqn: parse_entry(fqn, raw, checkpoint=self.path, format_version=version)
                for fqn, raw in self.manifest.get("pickled", {}).items()
            }
            #: large bytes values stored as arrays (format version 2)
            self.byte_arrays: dict[str, ArrayEntry] = {
                fqn: parse_entry(fqn, raw, checkpoint=self.path, format_version=version)
                for fqn, raw in self.manifest.get("bytes", {}).items()
            }
            check_tree(self.tree, tensors=self.arrays, pickled=self.pickled,
                       byte_arrays=self.byte_arrays, checkpoint=self.path)
        except (KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}: manifest is malformed ({e!r})"
            ) from None
        self.bytes_read = 0
        #: which checkpoint this is (ranks of one load must agree; None: format 1)
        self.version: str | None = self.manifest.get("checkpoint_id")
        #: fqn -> the array's zarr.json as stored, once checked
        self._checked: dict[str, bytes] = {}

    def what(self, entry: ArrayEntry) -> str:
        return f"checkpoint {self.path!r}, key {entry.fqn!r}"

    def check_metadata(self, entry: ArrayEntry) -> bytes:
        """Verify that the array's own zarr.json exists and matches the manifest
        (tensorstore and zarr read it: a damaged one is reported by every reader);
        return its bytes (read once per array)."""
        if entry.fqn in self._checked:
            return self._checked[entry.fqn]
        key = f"{entry.path}/zarr.json"
        try:
            data = self.store.read_small(key)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{self.what(entry)}: array metadata {self.store.location(key)!r} is missing"
            ) from None
        # the exact bytes zarrckpt writes for this entry pass without parsing
        if data != array_json(entry):
            try:
                document = loads_json(data)
            except ValueError as e:
                raise CorruptCheckpointError(
                    f"{self.what(entry)}: array metadata {self.store.location(key)!r} is not "
                    f"valid JSON ({e})"
                ) from None
            check_array_document(entry, document, checkpoint=self.path)
        self._checked[entry.fqn] = data
        return data

    def read_into(self, request: ReadRequest) -> int:
        """Fill one request; return the bytes read from disk."""
        self.check_metadata(request.entry)
        reader = ChunkReader(
            self.store,
            request.entry.path,
            request.entry.layout,
            self.what(request.entry),
            crcs=request.entry.crc_values(),
        )
        reader.read_into(request.dest, request.origin)
        return reader.bytes_read

    def read_many(self, requests: Iterable[ReadRequest], *, threads: int) -> int:
        """Fill every request; return the bytes read.

        Large requests are split by chunk and read by a pool of ``threads``
        threads, largest first (their time goes to ``preadv`` and crc32c, which
        release the GIL); requests under ``_PARALLEL_MIN_BYTES`` are read by
        the calling thread meanwhile: they cost mostly Python work, which
        threads would only contend for. On stores whose requests cost mostly a
        round trip (object stores, :attr:`Store.requests_per_thread` > 1) every
        part goes to a pool of ``threads * requests_per_thread`` threads.
        """
        requests = list(requests)
        fanout = self.store.requests_per_thread
        if threads * fanout <= 1:
            total = sum(self.read_into(r) for r in requests)
        else:
            parts: list[ReadRequest] = []
            for r in requests:
                parts.extend(_split_by_chunk(r))
            parts.sort(key=lambda r: -r.dest.nbytes)
            if fanout > 1:
                # object stores: every part is a round trip, so all go to the
                # threads, which stop taking parts at the first failure
                total = sum(parallel_map(self.read_into, parts, threads * fanout))
            else:
                total = self._read_local(parts, threads)
        self.bytes_read += total
        return total

    def _read_local(self, parts: list[ReadRequest], threads: int) -> int:
        """Parts of at least ``_PARALLEL_MIN_BYTES`` by a pool of ``threads``, the
        others by the calling thread meanwhile; the first failure cancels the
        parts not started."""
        big = [p for p in parts if p.dest.nbytes >= _PARALLEL_MIN_BYTES]
        small = [p for p in parts if p.dest.nbytes < _PARALLEL_MIN_BYTES]
        if len(big) <= 1:
            return sum(self.read_into(r) for r in big + small)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zarrckpt") as pool:
            futures = [pool.submit(self.read_into, r) for r in big]
            try:
                total = sum(self.read_into(r) for r in small)
                return total + sum(f.result() for f in futures)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def read_tensor(self, fqn: str, *, threads: int = 1) -> torch.Tensor:
        """Read a whole stored tensor into a new CPU tensor."""
        entry = self.arrays[fqn]
        dest = np.empty(entry.shape, dtype=entry.dtype.numpy_dtype)
        self.read_many([ReadRequest(entry, dest, (0,) * len(entry.shape))], threads=threads)
        return numpy_as_tensor(dest, entry.dtype.torch_dtype)

    def read_pickled(self, fqn: str, *, allow_pickle: bool) -> Any:
        """Unpickle a stored object (only with ``allow_pickle=True``)."""
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"checkpoint {self.path!r}: key {fqn!r} holds a pickled Python object; "
                "loading it would run arbitrary code. Pass allow_pickle=True only for "
                "checkpoints you trust"
            )
        entry = self.pickled[fqn]
        dest = np.empty(entry.shape, dtype=np.uint8)
        self.read_many([ReadRequest(entry, dest, (0,))], threads=1)
        return pickle.loads(dest.tobytes())


    def read_bytes(self, fqn: str) -> bytes:
        """Content of a bytes value stored as an array (``{"bytes": {"array": fqn}}``)."""
        entry = self.byte_arrays.get(fqn)
        if (
            entry is None
            or entry.kind != "bytes"
            or len(entry.shape) != 1
            or entry.dtype.numpy_dtype != np.dtype(np.uint8)
        ):
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}: the tree refers to bytes value {fqn!r}, which has "
                "no 1-D uint8 array in the manifest's 'bytes' section"
            )
        dest = np.empty(entry.shape, dtype=np.uint8)
        self.read_many([ReadRequest(entry, dest, (0,))], threads=1)
        return dest.tobytes()


#: requests of at least this many bytes go to the thread pool in read_many
_PARALLEL_MIN_BYTES = 1 << 20


#: a request is cut into parts of about this size for parallel reads
_PART_BYTES = 64 << 20


def _split_by_chunk(request: ReadRequest) -> list[ReadRequest]:
    """Cut a request along dim 0 into parts of whole chunks (of whole rows of inner
    chunks for a sharded chunk, about ``_PART_BYTES`` each)."""
    layout = request.entry.layout
    if request.dest.ndim == 0:
        return [request]
    rows = layout.chunk_shape[0]
    if layout.inner_shape is not None and layout.chunk_nbytes > _PART_BYTES:
        unit = layout.inner_shape[0]
        row_bytes = max(1, layout.chunk_nbytes // max(1, rows))
        rows = unit * max(1, _PART_BYTES // (row_bytes * unit))
    start = request.origin[0]
    stop = start + request.dest.shape[0]
    out = []
    cut = start
    while cut < stop:
        nxt = min(stop, (cut // rows + 1) * rows)
        out.append(
            ReadRequest(
                request.entry,
                request.dest[cut - start : nxt - start],
                (cut, *request.origin[1:]),
            )
        )
        cut = nxt
    return out
