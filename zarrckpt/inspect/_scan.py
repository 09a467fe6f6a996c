"""Parallel passes over the stored chunks of a checkpoint (stats, diff, verify).

A pass cuts every selected array into *slabs*: pieces of one stored chunk
made of whole inner chunks (sharded chunks) or the whole chunk (plain
chunks), about :data:`SLAB_BYTES` each, so that every stored byte is read
and checksummed exactly once and a worker never holds more than a slab (plus
its float64 work arrays) at a time. Consecutive slabs are packed into dask
tasks of about :data:`TASK_BYTES`; each task returns a small partial result
and the partials are combined on the client.

The tasks run on the active dask scheduler: a ``dask.distributed`` client
when one is the default, dask's threaded scheduler otherwise. Task
arguments are plain picklable values (the checkpoint's store, manifest
entries, regions), so they also run in worker processes.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..format._chunk_reader import ChunkReader
from ..format._layout import ArrayLayout, Region
from ..format._metadata import ArrayEntry
from ..storage._base import Store
from ..storage._local import open_store

__all__ = [
    "SLAB_BYTES",
    "TASK_BYTES",
    "Slab",
    "chunk_slabs",
    "plan_slabs",
    "pack",
    "read_region",
    "run_tasks",
    "Progress",
]

#: target size of one read inside a task (whole inner chunks, at least one)
SLAB_BYTES = 8 << 20
#: target amount of stored data handled by one dask task
TASK_BYTES = 32 << 20
#: at most this many slabs per task (many tiny tensors)
MAX_SLABS_PER_TASK = 512

#: ``progress(done_bytes, total_bytes)``
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Slab:
    """A region of one stored chunk, read in one go."""

    entry: ArrayEntry
    chunk: tuple[int, ...]
    region: Region
    #: first slab of its chunk (verify checks the chunk file once, there)
    first: bool

    @property
    def nbytes(self) -> int:
        return math.prod(b - a for a, b in self.region) * self.entry.layout.itemsize


def chunk_slabs(
    layout: ArrayLayout, index: tuple[int, ...], target_bytes: int = SLAB_BYTES
) -> list[Region]:
    """Cut chunk ``index`` (clipped to the array) into slabs of whole inner chunks.

    A plain (unsharded) chunk is one slab: its checksum covers all of it. A
    sharded chunk is cut along the innermost dimension its inner chunks split,
    grouping about ``target_bytes`` of inner chunks per slab.
    """
    region = layout.chunk_region(index)
    if layout.inner_shape is None or not layout.shape:
        return [region]
    chunk, inner = layout.chunk_shape, layout.inner_shape
    split = [d for d in range(len(chunk)) if inner[d] < chunk[d]]
    if not split:
        return [region]
    k = split[-1]
    per_slab = max(1, target_bytes // max(1, layout.inner_nbytes))
    step = list(inner)
    step[k] = min(chunk[k], inner[k] * per_slab)
    ranges = []
    for d, (start, stop) in enumerate(region):
        ranges.append([(a, min(a + step[d], stop)) for a in range(start, stop, step[d])])
    out: list[Region] = [()]
    for dim_ranges in ranges:
        out = [r + (x,) for r in out for x in dim_ranges]
    return out


def plan_slabs(entries: Iterable[ArrayEntry], target_bytes: int = SLAB_BYTES) -> list[Slab]:
    """Every slab of every chunk of ``entries``, in array and chunk order."""
    out = []
    for entry in entries:
        for index in entry.layout.chunk_indices():
            for i, region in enumerate(chunk_slabs(entry.layout, index, target_bytes)):
                out.append(Slab(entry, tuple(index), region, i == 0))
    return out


def pack(
    items: Sequence[Any],
    size: Callable[[Any], int],
    target: int | None = None,
    max_items: int | None = None,
) -> list[list[Any]]:
    """Group consecutive items into lists of about ``target`` total size
    (default :data:`TASK_BYTES`, at most :data:`MAX_SLABS_PER_TASK` items)."""
    target = TASK_BYTES if target is None else target
    max_items = MAX_SLABS_PER_TASK if max_items is None else max_items
    groups: list[list[Any]] = []
    current: list[Any] = []
    total = 0
    for item in items:
        n = size(item)
        if current and (total + n > target or len(current) >= max_items):
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    if current:
        groups.append(current)
    return groups


def what(root: str | Store, entry: ArrayEntry) -> str:
    path = root.path if isinstance(root, Store) else root
    return f"checkpoint {path!r}, key {entry.fqn!r}"


def read_region(root: str | Store, entry: ArrayEntry, region: Region) -> np.ndarray:
    """Read one region of an array (checksums verified) into a new array."""
    dest = np.empty(tuple(b - a for a, b in region), dtype=entry.dtype.numpy_dtype)
    if dest.size:
        store = open_store(root)
        reader = ChunkReader(
            store, entry.path, entry.layout, what(store, entry), crcs=entry.crc_values()
        )
        reader.read_into(dest, tuple(a for a, _ in region))
    return dest


def _distributed_client(scheduler: Any) -> Any:
    """The ``distributed.Client`` behind dask's active scheduler, or None."""
    client = getattr(scheduler, "__self__", None)
    if client is not None and type(client).__module__.startswith("distributed"):
        return client
    return None


def run_tasks(
    func: Callable[..., Any],
    groups: Sequence[Any],
    args: tuple[Any, ...] = (),
    *,
    weights: Sequence[int] | None = None,
    progress: Progress | None = None,
    name: str = "zarrckpt",
) -> list[Any]:
    """Run ``func(group, *args)`` for every group on the active dask scheduler.

    Returns the results in group order. ``progress(done, total)`` is called as
    tasks finish, with the summed ``weights`` of finished tasks.
    """
    if not groups:
        return []
    import dask
    from dask.base import get_scheduler
    from dask.delayed import delayed

    token = uuid.uuid4().hex[:12]
    keys = [f"{name}-{token}-{i}" for i in range(len(groups))]
    call = delayed(func, pure=False)
    parts = [call(g, *args, dask_key_name=k) for g, k in zip(groups, keys, strict=True)]
    weight_of = dict(zip(keys, weights if weights is not None else [1] * len(keys), strict=True))
    total = sum(weight_of.values())

    client = _distributed_client(get_scheduler())
    if client is not None:
        from distributed import as_completed

        futures = client.compute(parts)
        results: dict[str, Any] = {}
        done = 0
        for fut in as_completed(futures):
            results[fut.key] = fut.result()
            done += weight_of[fut.key]
            if progress is not None:
                progress(done, total)
        return [results[k] for k in keys]

    if progress is None:
        return list(dask.compute(*parts))

    from dask.callbacks import Callback

    state = {"done": 0}

    def posttask(key: Any, result: Any, dsk: Any, st: Any, worker_id: Any) -> None:
        if key in weight_of:
            state["done"] += weight_of[key]
            progress(state["done"], total)

    with Callback(posttask=posttask):
        return list(dask.compute(*parts))
