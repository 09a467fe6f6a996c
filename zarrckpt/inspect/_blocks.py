"""The dask blocks of :meth:`zarrckpt.inspect.Checkpoint.dask`: a stored array read
through zarrckpt's verified chunk reader."""

from __future__ import annotations

import builtins
import os
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError
from ..format._chunkio import ChunkReader
from ..format._metadata import ArrayEntry, check_array_document
from ..parallel._reader import CheckpointFiles

__all__ = ["_ChunkSource"]


class _ChunkSource:
    """Array-like object dask reads blocks from, through zarrckpt's verified reader.

    Pickles as (checkpoint path, manifest entry) only, so dask.distributed can
    ship it to worker processes without the whole manifest.
    """

    def __init__(self, path: str, entry: ArrayEntry, files: CheckpointFiles | None = None) -> None:
        self.path = path
        self.entry = entry
        self.files = files
        self.shape = entry.shape
        self.dtype = entry.dtype.numpy_dtype
        self.ndim = len(entry.shape)
        self._checked = False

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "entry": self.entry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["entry"])  # type: ignore[misc]

    def _check_metadata(self) -> None:
        if self._checked:
            return
        if self.files is not None:
            self.files.check_metadata(self.entry)
        else:
            import json

            doc_path = os.path.join(self.path, self.entry.path, "zarr.json")
            try:
                with builtins.open(doc_path, "rb") as f:
                    document = json.loads(f.read())
            except (OSError, ValueError) as e:
                raise CorruptCheckpointError(
                    f"checkpoint {self.path!r}, key {self.entry.fqn!r}: array metadata "
                    f"{doc_path!r} is missing or unreadable ({e})"
                ) from None
            check_array_document(self.entry, document, checkpoint=self.path)
        self._checked = True

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        starts, stops = [], []
        for k, size in zip(key, self.shape, strict=False):
            start, stop, step = k.indices(size)
            assert step == 1, "dask asks for contiguous blocks"
            starts.append(start)
            stops.append(max(start, stop))
        for size in self.shape[len(key) :]:
            starts.append(0)
            stops.append(size)
        dest = np.empty([b - a for a, b in zip(starts, stops, strict=True)], dtype=self.dtype)
        if dest.size:
            self._check_metadata()
            reader = ChunkReader(
                os.path.join(self.path, self.entry.path),
                self.entry.layout,
                f"checkpoint {self.path!r}, key {self.entry.fqn!r}",
            )
            reader.read_into(dest, tuple(starts))
        return dest
