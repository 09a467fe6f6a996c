"""The dask blocks of :meth:`zarrckpt.inspect.Checkpoint.dask`: a stored array read
through zarrckpt's verified chunk reader."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError
from ..format._chunk_reader import ChunkReader
from ..format._json import loads_json
from ..format._metadata import ArrayEntry, check_array_document
from ..parallel._reader import CheckpointFiles
from ..storage._base import Store
from ..storage._local import open_store

__all__ = ["_ChunkSource"]


class _ChunkSource:
    """Array-like object dask reads blocks from, through zarrckpt's verified reader.

    Pickles as (checkpoint store, manifest entry) only, so dask.distributed can
    ship it to worker processes without the whole manifest.
    """

    def __init__(
        self, path: str | Store, entry: ArrayEntry, files: CheckpointFiles | None = None
    ) -> None:
        self.store = open_store(path)
        self.path = self.store.path
        self.entry = entry
        self.files = files
        self.shape = entry.shape
        self.dtype = entry.dtype.numpy_dtype
        self.ndim = len(entry.shape)
        self._checked = False

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "entry": self.entry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], state["entry"])  # type: ignore[misc]

    def _check_metadata(self) -> None:
        if self._checked:
            return
        if self.files is not None:
            self.files.check_metadata(self.entry)
        else:
            key = f"{self.entry.path}/zarr.json"
            doc_path = self.store.location(key)
            try:
                document = loads_json(self.store.read_small(key))
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
                self.store,
                self.entry.path,
                self.entry.layout,
                f"checkpoint {self.path!r}, key {self.entry.fqn!r}",
                crcs=self.entry.crc_values(),
            )
            reader.read_into(dest, tuple(starts))
        return dest
