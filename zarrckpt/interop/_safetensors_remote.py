"""safetensors files on object stores, read by ranged GETs (no local copy).

A safetensors file is one header and then every tensor's C-order bytes at
known offsets, so a reader on an object store needs no copy of the file: the
header comes from two ranged GETs, a tensor's rows ``[a, b)`` are one byte
range. :class:`RemoteSafetensorsReader` serves the converter
(:func:`zarrckpt.convert.from_safetensors`: whole tensors, read ahead by a
:class:`Prefetcher` within :data:`PREFETCH_BYTES`, so memory holds a few
tensors, never the file), and
:class:`RemoteSafetensorsFile` serves :func:`zarrckpt.load` (each rank reads
the rows its target shards hold, many GETs in flight).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..format._dtypes import DTypeInfo, info_for_torch, numpy_as_tensor
from ..parallel._writer import parallel_map
from ..storage._local import open_store
from ._safetensors_io import SafetensorsEntry, parse_header, read_layout

__all__ = [
    "HEAD_BYTES",
    "PREFETCH_BYTES",
    "Prefetcher",
    "RemoteSafetensorsFile",
    "RemoteSafetensorsReader",
]

#: bytes of tensors the converter reads ahead of the one it writes
PREFETCH_BYTES = 256 << 20
#: bytes of the first GET (the header length and, usually, the whole header)
HEAD_BYTES = 64 << 10
#: bytes of one GET at most (a larger read is several, one after the other)
GET_BYTES = 64 << 20


class RemoteSafetensorsReader:
    """A safetensors object (``s3://bucket/model.safetensors``), its header parsed.

    Has the ``path``, ``metadata`` and ``entries`` of
    :class:`~zarrckpt.interop._safetensors_io.SafetensorsReader`; tensor bytes are
    read on demand (:meth:`rows`).

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        No object at the URL.
    zarrckpt.errors.CorruptCheckpointError
        The header is malformed or offsets are inconsistent.
    """

    def __init__(self, url: str) -> None:
        self.path = url
        store = open_store(url)
        self.requests_per_thread = store.requests_per_thread
        self._reader = store.open_reader("")
        # the first GET brings the header (most are smaller) and the object's size
        try:
            self._head = self.read(0, HEAD_BYTES)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"no safetensors file at {url!r} (no such object)"
            ) from None
        self.metadata, self.entries = parse_header(url, self._reader.size, self._read_header)

    def _read_header(self, offset: int, n: int) -> bytes:
        if offset + n <= len(self._head):
            return self._head[offset : offset + n]
        return self.read(offset, n)

    @property
    def version(self) -> str | None:
        """The ETag of the object's version read (every read asks for that one)."""
        return getattr(self._reader, "e_tag", None)

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from byte ``offset``; return the bytes read (fewer at the end)."""
        got = 0
        while got < len(view):
            n = self._reader.readv_into([view[got : got + GET_BYTES]], offset + got)
            if n == 0:
                break
            got += n
        return got

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes from ``offset`` (fewer at the end of the object)."""
        buf = bytearray(n)
        return bytes(buf[: self.read_into(memoryview(buf), offset)])

    def fill(self, entry: SafetensorsEntry, offset: int, dest: np.ndarray) -> None:
        """Fill the C-contiguous ``dest`` with the bytes of ``entry`` from ``offset``
        (relative to the tensor's first byte)."""
        if not dest.flags.c_contiguous:  # reshape would copy: the bytes would be lost
            raise ValueError("RemoteSafetensorsReader.fill needs a C-contiguous array")
        view = dest.reshape(-1).view(np.uint8).data  # ml_dtypes arrays too
        if self.read_into(view, entry.begin + offset) != len(view):
            raise CorruptCheckpointError(
                f"safetensors file {self.path!r}: tensor {entry.name!r} is cut short "
                "(the object ended while it was read)"
            )

    def rows(self, entry: SafetensorsEntry, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (dim 0) of ``entry`` as a new array (the whole
        tensor for a 0-d one), its zarrckpt numpy dtype."""
        dtype = info_for_torch(entry.dtype).numpy_dtype
        if not entry.shape:
            out = np.empty((), dtype=dtype)
            self.fill(entry, 0, out)
            return out
        row_bytes = dtype.itemsize * math.prod(entry.shape[1:])
        out = np.empty((stop - start, *entry.shape[1:]), dtype=dtype)
        if out.size:
            self.fill(entry, start * row_bytes, out)
        return out

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> RemoteSafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class RemoteEntry:
    """One tensor of a :class:`RemoteSafetensorsFile` (what a load plan needs)."""

    fqn: str
    dtype: DTypeInfo
    shape: tuple[int, ...]
    source: SafetensorsEntry

    @property
    def nbytes(self) -> int:
        return self.source.nbytes


class RemoteSafetensorsFile:
    """A safetensors object as a source of :func:`zarrckpt.load`: each read request
    (a rank's part of a tensor) is one ranged GET of the rows it needs.

    Tensors are offered under their names, or with the nesting and plain values
    recorded by :func:`zarrckpt.convert.to_safetensors`, as for a local file
    (:class:`~zarrckpt.interop._file_source.SafetensorsFile`).
    """

    def __init__(self, url: str) -> None:
        self._reader = RemoteSafetensorsReader(url)
        self.path = url
        self.tree, _record, complex_names = read_layout(self._reader)
        self.arrays: dict[str, RemoteEntry] = {}
        for name, e in self._reader.entries.items():
            dtype, shape = e.dtype, e.shape
            if name in complex_names:  # float64 pairs: the same bytes as complex128
                dtype, shape = torch.complex128, e.shape[:-1]
            info = info_for_torch(dtype, key=name, path=url)
            self.arrays[name] = RemoteEntry(name, info, tuple(shape), e)
        #: a safetensors file holds no pickled values
        self.pickled: dict[str, Any] = {}
        self.bytes_read = 0
        #: the ETag of the object's version read (ranks of one load must agree)
        self.version = self._reader.version

    def read_pickled(self, fqn: str, *, allow_pickle: bool) -> Any:
        raise KeyError(fqn)  # the tree of a safetensors file names no pickled value

    def read_bytes(self, fqn: str) -> bytes:
        raise KeyError(fqn)  # nor large bytes values (inline ones are in the tree)

    def read_into(self, request: Any) -> int:
        """Fill ``request.dest`` with its region of the tensor: one ranged GET of the
        rows it spans (straight into ``dest`` when it holds whole rows)."""
        entry: RemoteEntry = request.entry
        dest: np.ndarray = request.dest
        origin: tuple[int, ...] = tuple(request.origin)
        if not entry.shape:
            dest[...] = self._tensor_rows(entry, 0, 0)
            return int(dest.nbytes)
        start, stop = origin[0], origin[0] + dest.shape[0]
        whole_rows = not any(origin[1:]) and tuple(dest.shape[1:]) == entry.shape[1:]
        if whole_rows and dest.flags.c_contiguous:
            row_bytes = entry.dtype.numpy_dtype.itemsize * math.prod(entry.shape[1:])
            if dest.size:
                self._reader.fill(entry.source, start * row_bytes, dest)
            return int(dest.nbytes)
        rows = self._tensor_rows(entry, start, stop)
        index = tuple(slice(o, o + s) for o, s in zip(origin[1:], dest.shape[1:], strict=True))
        np.copyto(dest, rows[(slice(None), *index)], casting="no")
        return int(rows.nbytes)

    def _tensor_rows(self, entry: RemoteEntry, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``entry`` (the whole tensor for a 0-d one)."""
        source = entry.source
        if not entry.shape:  # a 0-d complex128 is stored as 2 float64
            start, stop = 0, source.shape[0] if source.shape else 0
        rows = self._reader.rows(source, start, stop)
        return rows.view(entry.dtype.numpy_dtype).reshape(
            (stop - start, *entry.shape[1:]) if entry.shape else ()
        )

    def read_many(self, requests: Iterable[Any], *, threads: int) -> int:
        """Fill every request, ``threads * requests_per_thread`` GETs in flight."""
        requests = list(requests)
        workers = max(1, threads) * self._reader.requests_per_thread
        total = sum(parallel_map(self.read_into, requests, workers))
        self.bytes_read += total
        return total

    def read_tensor(self, fqn: str) -> torch.Tensor:
        """A whole tensor (CPU, its dtype)."""
        entry = self.arrays[fqn]
        rows = self._tensor_rows(entry, 0, entry.shape[0] if entry.shape else 0)
        return numpy_as_tensor(np.ascontiguousarray(rows), entry.dtype.torch_dtype)

    def close(self) -> None:
        self._reader.close()


class Prefetcher:
    """Whole tensors of a :class:`RemoteSafetensorsReader`, read ahead in file order
    by ``threads`` threads while the caller writes the previous ones.

    Tensors read but not yet taken hold at most ``window`` bytes (a larger tensor
    is read alone); :meth:`take` of a tensor not read ahead reads it in the
    calling thread, so any order of takes works.
    """

    def __init__(
        self,
        reader: RemoteSafetensorsReader,
        entries: list[SafetensorsEntry],
        *,
        threads: int,
        window: int = PREFETCH_BYTES,
    ) -> None:
        self._reader = reader
        self._order = sorted(entries, key=lambda e: e.begin)  # file order
        self._window = window
        self._cond = threading.Condition()
        self._next = 0  # index in _order of the next tensor to read ahead
        self._held = 0  # bytes read ahead (or being read) and not taken
        self._ready: dict[str, np.ndarray | BaseException] = {}
        self._busy: set[str] = set()
        self._taken: set[str] = set()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name="zarrckpt-prefetch", daemon=True)
            for _ in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def _claim(self) -> SafetensorsEntry | None:
        with self._cond:
            while not self._closed:
                while self._next < len(self._order) and self._order[self._next].name in (
                    self._taken
                ):
                    self._next += 1
                if self._next >= len(self._order):
                    return None
                e = self._order[self._next]
                if self._held == 0 or self._held + e.nbytes <= self._window:
                    self._next += 1
                    self._held += e.nbytes
                    self._busy.add(e.name)
                    return e
                self._cond.wait()
            return None

    def _work(self) -> None:
        while (e := self._claim()) is not None:
            result: np.ndarray | BaseException
            try:
                result = self._reader.rows(e, 0, e.shape[0] if e.shape else 0)
            except BaseException as exc:  # handed to take()
                result = exc
            with self._cond:
                self._busy.discard(e.name)
                self._ready[e.name] = result  # take() waits while it is busy
                self._cond.notify_all()

    def take(self, entry: SafetensorsEntry) -> np.ndarray:
        """The whole tensor ``entry`` (its zarrckpt numpy dtype)."""
        with self._cond:
            while entry.name in self._busy:
                self._cond.wait()
            result = self._ready.pop(entry.name, None)
            self._taken.add(entry.name)
            if result is not None:
                self._held -= entry.nbytes
                self._cond.notify_all()
        if result is None:
            return self._reader.rows(entry, 0, entry.shape[0] if entry.shape else 0)
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        """Stop reading ahead; drop what was read and not taken."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join()
