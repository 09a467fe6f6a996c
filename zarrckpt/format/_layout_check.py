"""Sanity bounds of an array layout read from a checkpoint (a manifest record).

A manifest can be crafted (its crc32c binding catches damage, not intent), so
before a reader plans anything from a record, :func:`check_layout` checks that
shape, chunk shape and inner chunk shape are lists of plain integers of the
same length (shape >= 0, chunks > 0, inner chunks dividing their chunk), that
the array holds at most :data:`MAX_NBYTES` bytes and :data:`MAX_CHUNKS` chunks
(and each chunk :data:`MAX_CHUNKS` inner chunks). A claim of 10**15 chunks is
thereby refused before anything enumerates or allocates it.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import CorruptCheckpointError

__all__ = ["check_layout", "MAX_CHUNKS", "MAX_NBYTES"]

#: most chunks (and inner chunks per chunk) one array may have (2**24: 1 PiB in 64 MiB chunks)
MAX_CHUNKS = 1 << 24
#: largest array accepted (2**56 bytes = 64 PiB)
MAX_NBYTES = 1 << 56


def _ints(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(type(v) is int for v in value)


def check_layout(
    fqn: str, shape: Any, chunk_shape: Any, inner: Any, itemsize: int, *, checkpoint: str
) -> None:
    """Raise :class:`~zarrckpt.errors.CorruptCheckpointError` unless the layout is sane."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"checkpoint {checkpoint!r}: manifest record of {fqn!r} has shape "
            f"{str(shape)[:60]}, chunk shape {str(chunk_shape)[:60]}, inner chunk shape "
            f"{str(inner)[:60]}: {why}"
        )

    if not (_ints(shape) and _ints(chunk_shape) and (inner is None or _ints(inner))):
        raise bad("expected lists of integers")
    if len(chunk_shape) != len(shape) or (inner is not None and len(inner) != len(shape)):
        raise bad("their lengths differ")
    if any(s < 0 for s in shape) or any(c <= 0 for c in chunk_shape):
        raise bad("expected shape >= 0 and chunk shape > 0")
    if math.prod(shape) * itemsize > MAX_NBYTES:
        raise bad(f"the array would hold more than {MAX_NBYTES} bytes")
    if math.prod(-(-s // c) for s, c in zip(shape, chunk_shape, strict=True)) > MAX_CHUNKS:
        raise bad(f"more than {MAX_CHUNKS} chunks")
    if math.prod(chunk_shape) * itemsize > MAX_NBYTES:
        raise bad(f"a chunk would hold more than {MAX_NBYTES} bytes")
    if inner is not None:
        if any(i <= 0 or c % i for c, i in zip(chunk_shape, inner, strict=True)):
            raise bad("inner chunks must be > 0 and divide the chunk shape")
        if math.prod(c // i for c, i in zip(chunk_shape, inner, strict=True)) > MAX_CHUNKS:
            raise bad(f"more than {MAX_CHUNKS} inner chunks per chunk")
