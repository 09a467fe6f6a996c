"""Write a zarrckpt checkpoint one tensor (one chunk) at a time, for the converters.

:func:`zarrckpt.save` takes a whole state dict that is already in memory. A
converter reads its source piece by piece instead, so :class:`CheckpointBuilder`
exposes the save steps separately: declare an array (its ``zarr.json`` is
written at once), write some of its chunks from whatever buffer holds them,
release that buffer, go on; commit the manifest, the commit marker and the
atomic publish at the end. Everything goes to a hidden staging directory
beside the destination (the same protocol as ``save``): a conversion that
fails or is interrupted leaves the destination as it was.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...errors import InvalidKeyError
from ...format._codec import encode_chunk, encode_piece
from ...format._dtypes import info_for_torch
from ...format._flatten import pickle_value
from ...format._layout import ArrayLayout, choose_layout
from ...format._metadata import ArrayEntry, array_path, root_document
from ...format._shard import StoredArray, plan_storage
from ...parallel._writer import _WRITEBACK_MIN_BYTES, crc_table, write_metadata
from ...storage._local import open_store

__all__ = ["CheckpointBuilder", "ProgressFn", "ProgressTracker"]

#: ``progress(bytes_done, bytes_total, tensors_done, tensors_total)``
ProgressFn = Callable[[int, int, int, int], None]


class ProgressTracker:
    """Counts converted bytes and tensors and reports them to an optional callback."""

    def __init__(self, callback: ProgressFn | None, bytes_total: int, tensors_total: int) -> None:
        self.callback = callback
        self.bytes_total = bytes_total
        self.tensors_total = tensors_total
        self.bytes_done = 0
        self.tensors_done = 0
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.bytes_done, self.bytes_total, self.tensors_done, self.tensors_total)

    def add_bytes(self, n: int) -> None:
        self.bytes_done += n
        self._report()

    def tensor_done(self) -> None:
        self.tensors_done += 1
        self._report()


@dataclass
class _Pending:
    future: Future[int]
    release: Callable[[], None] | None


class CheckpointBuilder:
    """A zarrckpt checkpoint under construction in a staging directory.

    Use as a context manager: leaving the block with an exception removes the
    staging directory; :meth:`commit` publishes the checkpoint.

    Parameters
    ----------
    path
        Destination checkpoint directory.
    overwrite, fsync, chunk_bytes, inner_chunk_bytes
        As for :func:`zarrckpt.save`.
    threads
        Chunk files written concurrently (at most ``2 * threads`` in flight).
    """

    def __init__(
        self,
        path: str,
        *,
        overwrite: bool,
        fsync: bool,
        chunk_bytes: int,
        inner_chunk_bytes: int,
        threads: int,
    ) -> None:
        self.path = path
        self.overwrite = overwrite
        self.fsync = fsync
        self.chunk_bytes = chunk_bytes
        self.inner_chunk_bytes = inner_chunk_bytes
        self.threads = max(1, threads)
        self.store = open_store(path)
        self.store.check_writable(overwrite=overwrite)
        self.staging = self.store.stage(overwrite=overwrite)
        self.entries: list[ArrayEntry] = []
        self._paths: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zarrckpt-convert")
        self._pending: list[_Pending] = []
        self._stored: dict[str, StoredArray] = {}
        self._crcs: dict[str, dict[int, int]] = {}
        self._lock = threading.Lock()
        self.bytes_written = 0
        self._closed = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> CheckpointBuilder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far (the destination is untouched)."""
        if self._closed:
            return
        self._closed = True
        for p in self._pending:
            p.future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self.staging.abort()

    # ------------------------------------------------------------ arrays
    def _claim(self, entry: ArrayEntry) -> None:
        other = self._paths.get(entry.path)
        if other is not None:
            raise InvalidKeyError(
                f"keys {other!r} and {entry.fqn!r} map to the same array path {entry.path!r} "
                f"in checkpoint {self.path!r}"
            )
        self._paths[entry.path] = entry.fqn

    def add_tensor(
        self,
        fqn: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        *,
        chunk_shape: tuple[int, ...] | None = None,
        layout: ArrayLayout | None = None,
    ) -> ArrayEntry:
        """Declare a tensor array (writes its ``zarr.json``); return its entry, whose
        layout is the grid of pieces that :meth:`write_chunks` takes.

        The piece grid is ``layout`` if given, else ``chunk_shape`` (a shard
        grid), else row slabs of about ``chunk_bytes`` (as ``save`` does for an
        unsharded tensor). Where the pieces go in the files is planned as for
        :func:`zarrckpt.save` (:func:`~zarrckpt.format._shard.plan_storage`).
        """
        if not fqn:
            raise InvalidKeyError(
                f"a tensor at the root of the state dict cannot be stored in checkpoint "
                f"{self.path!r}; put it under a key"
            )
        info = info_for_torch(dtype, key=fqn, path=self.path)
        if layout is None:
            layout = choose_layout(
                tuple(shape),
                info.numpy_dtype.itemsize,
                chunk_shape=chunk_shape,
                chunk_bytes=self.chunk_bytes,
                inner_bytes=self.inner_chunk_bytes,
            )
        entry = ArrayEntry(fqn, array_path(fqn, checkpoint=self.path), info, layout)
        self._declare(entry)
        return entry

    def add_pickled(self, fqn: str, obj: Any) -> None:
        """Store ``obj`` with pickle (the caller checked ``allow_pickle``)."""
        self._add_uint8(fqn, pickle_value(fqn, obj, checkpoint=self.path), "pickle")

    def add_bytes(self, fqn: str, data: bytes) -> None:
        """Store a large bytes value (``{"bytes": {"array": fqn}}`` node) as an array."""
        self._add_uint8(fqn, data, "bytes")

    def _add_uint8(self, fqn: str, raw: bytes, kind: str) -> None:
        data = np.frombuffer(raw, np.uint8)
        info = info_for_torch(torch.uint8)
        layout = choose_layout(
            (data.size,), 1, chunk_bytes=self.chunk_bytes, inner_bytes=self.inner_chunk_bytes
        )
        path = array_path(fqn, kind, checkpoint=self.path)
        entry = ArrayEntry(fqn, path, info, layout, kind)
        self._declare(entry)
        self.write_chunks(entry, data, (0,))
        self.drain()

    def _declare(self, entry: ArrayEntry) -> None:
        """Plan the files of ``entry`` (whose layout is the piece grid), write its
        ``zarr.json`` and, for a shard file, its index."""
        self._claim(entry)
        stored = plan_storage(entry.layout, shared_files=self.store.shared_files)
        final = dataclasses.replace(entry, layout=stored.layout)
        write_metadata(self.staging, [final])
        self.entries.append(final)
        self._stored[entry.fqn] = stored
        self._crcs[entry.fqn] = {}
        if stored.mode == "shard":
            key = f"{entry.path}/{stored.layout.chunk_key((0,) * stored.layout.ndim)}"
            self.staging.write_chunk_at(key, 0, [stored.index_bytes()])

    # ------------------------------------------------------------ chunks
    def _write_one(self, entry: ArrayEntry, index: tuple[int, ...], source: np.ndarray,
                   origin: tuple[int, ...]) -> int:
        stored = self._stored[entry.fqn]
        target = stored.target(index)
        key = f"{entry.path}/{target.key}"
        # with fsync, large pieces start their writeback at once (as zarrckpt.save does)
        writeback = self.fsync and entry.layout.chunk_nbytes >= _WRITEBACK_MIN_BYTES
        if target.offset is None:
            buffers, crcs = encode_chunk(stored.layout, index, source, origin)
            written = self.staging.write_chunk(key, buffers, writeback=writeback)
        else:
            buffers, crcs = encode_piece(stored.pieces, index, source, origin)
            written = self.staging.write_chunk_at(key, target.offset, buffers, writeback=writeback)
        with self._lock:
            self._crcs[entry.fqn].update(zip(target.positions, crcs, strict=True))
        return written

    def _collect(self, block: bool) -> None:
        """Wait for finished writes (for at least one when ``block``), raise their errors."""
        if not self._pending:
            return
        done, _ = wait(
            [p.future for p in self._pending],
            timeout=None if block else 0,
            return_when=FIRST_COMPLETED,
        )
        keep = []
        for p in self._pending:
            if p.future in done:
                self.bytes_written += p.future.result()
                if p.release is not None:
                    p.release()
            else:
                keep.append(p)
        self._pending = keep

    def write_chunks(
        self,
        entry: ArrayEntry,
        source: np.ndarray,
        origin: tuple[int, ...],
        indices: Iterable[tuple[int, ...]] | None = None,
        *,
        release: Callable[[tuple[int, ...]], None] | None = None,
        written: Callable[[int], None] | None = None,
    ) -> None:
        """Write chunks ``indices`` (default: all) of ``entry`` from ``source``.

        ``source`` holds the array region starting at element ``origin`` and
        must stay valid until :meth:`drain` returns. ``release(index)`` is
        called once chunk ``index`` is on disk (to free the source memory
        behind it); ``written(nbytes)`` counts the chunk's data bytes.
        """
        if indices is None:
            indices = entry.layout.chunk_indices()
        for index in indices:
            while len(self._pending) >= 2 * self.threads:
                self._collect(block=True)
            future = self._pool.submit(self._write_one, entry, index, source, origin)
            region = entry.layout.chunk_region(index)
            nbytes = entry.dtype.numpy_dtype.itemsize
            for a, b in region:
                nbytes *= b - a

            def done(index: tuple[int, ...] = index, nbytes: int = nbytes) -> None:
                if release is not None:
                    release(index)
                if written is not None:
                    written(nbytes)

            self._pending.append(_Pending(future, done))

    def drain(self) -> None:
        """Wait until every chunk write issued so far is on disk (raise the first error)."""
        while self._pending:
            self._collect(block=True)

    # ------------------------------------------------------------ commit
    def commit(self, tree: dict[str, Any], *, extra: dict[str, Any] | None = None) -> None:
        """Write the manifest and the commit marker, then publish the checkpoint."""
        self.drain()
        self._pool.shutdown(wait=True)
        self._check_tree(tree)
        checkpoint_id = uuid.uuid4().hex
        entries = [
            dataclasses.replace(e, crcs=crc_table(e, self._stored[e.fqn], self._crcs[e.fqn]))
            for e in self.entries
        ]
        root = root_document(tree=tree, entries=entries, checkpoint_id=checkpoint_id, extra=extra)
        if self.fsync:
            self.staging.sync()
        self.staging.commit(root, checkpoint_id, overwrite=self.overwrite, fsync=self.fsync)
        self._closed = True

    def _check_tree(self, tree: dict[str, Any]) -> None:
        """Every tensor / pickle / bytes-array node of ``tree`` has an array, and every
        array a node."""
        kinds = {e.fqn: e.kind for e in self.entries}
        seen: set[str] = set()

        def visit(node: Any) -> None:
            if isinstance(node, dict):
                refs = dict(node)
                if isinstance(node.get("bytes"), dict) and "array" in node["bytes"]:
                    refs["bytes"] = node["bytes"]["array"]
                for kind in ("tensor", "pickle", "bytes"):
                    if kind in refs and isinstance(refs[kind], str):
                        fqn = refs[kind]
                        if kinds.get(fqn) != kind:
                            raise InvalidKeyError(
                                f"internal error: {kind} {fqn!r} of checkpoint {self.path!r} "
                                "has no stored array"
                            )
                        seen.add(fqn)
                        return
                for value in node.values():
                    visit(value)
            elif isinstance(node, list):
                for value in node:
                    visit(value)

        visit(tree)
        unused = set(kinds) - seen
        if unused:
            raise InvalidKeyError(
                f"internal error: arrays {sorted(unused)[:5]} of checkpoint {self.path!r} "
                "are not in its tree"
            )
