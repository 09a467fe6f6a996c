"""Write a deferred state in turns within a staging budget (``async_save``).

``async_save(..., staging_budget_bytes=B)`` of a state larger than ``B`` does
not copy the caller's tensors before it returns (that would double host
memory). The background save instead copies the pieces this rank writes in
turns: pieces are grouped into batches of at most ``B`` bytes (a piece larger
than ``B`` is a batch of its own), each batch is copied out of the caller's
tensors into host buffers, written, and its buffers freed before the next
batch is copied. Extra host memory therefore stays within ``B`` plus one piece.
Once the last batch is copied the caller's tensors are no longer needed:
``on_staged`` is called, which resolves the future's ``staged`` future.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..format._dtypes import tensor_as_numpy
from ..format._metadata import ArrayEntry
from ..format._shard import StoredArray
from ..storage._base import Staging
from ._writer import ChunkWrite, IndexWrite, WriteResult, write_arrays

if TYPE_CHECKING:  # pragma: no cover
    from ._save import SaveOptions

__all__ = ["PendingPiece", "write_in_turns", "batches"]


@dataclass(frozen=True)
class PendingPiece:
    """A piece still in the caller's tensor ``block`` (placed at array element
    ``origin``): piece ``index`` of ``stored.pieces`` of ``entry``."""

    entry: ArrayEntry
    stored: StoredArray
    index: tuple[int, ...]
    block: torch.Tensor
    origin: tuple[int, ...]

    @property
    def region(self) -> tuple[tuple[int, int], ...]:
        return self.stored.pieces.chunk_region(self.index)

    @property
    def nbytes(self) -> int:
        n = self.block.element_size()
        for a, b in self.region:
            n *= b - a
        return n

    def copy(self) -> ChunkWrite:
        """The piece copied into a new host buffer (numpy memory, so that
        ``tracemalloc`` sees it), as a chunk write."""
        region = self.region
        src = self.block[
            tuple(slice(a - o, b - o) for (a, b), o in zip(region, self.origin, strict=True))
        ]
        raw = np.empty(self.nbytes, dtype=np.uint8)
        dst = torch.from_numpy(raw).view(self.block.dtype).view(src.shape)
        dst.copy_(src)  # from any device; resolves conj/neg views
        start = tuple(a for a, _ in region)
        return ChunkWrite.of(self.entry, self.stored, self.index, tensor_as_numpy(dst), start)


def batches(pieces: list[PendingPiece], budget: int) -> Iterator[list[PendingPiece]]:
    """Consecutive groups of pieces of at most ``budget`` bytes (a larger piece alone)."""
    batch: list[PendingPiece] = []
    size = 0
    for piece in pieces:
        if batch and size + piece.nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append(piece)
        size += piece.nbytes
    if batch:
        yield batch


def write_in_turns(
    staging: Staging,
    metadata: list[ArrayEntry],
    ready: list[ChunkWrite | IndexWrite],
    pending: list[PendingPiece],
    budget: int,
    options: SaveOptions,
    on_staged: Callable[[], None],
) -> WriteResult:
    """Write the ``ready`` writes and array ``metadata``, then the ``pending`` pieces
    batch by batch (copy, write, free); ``on_staged()`` once the last batch is copied."""
    result = write_arrays(staging, metadata, ready, threads=options.threads)
    groups = list(batches(pending, budget))
    for i, group in enumerate(groups):
        writes: list[Any] = [piece.copy() for piece in group]
        if i == len(groups) - 1:
            on_staged()
        result.merge(write_arrays(staging, [], writes, threads=options.threads))
        del writes
    return result
