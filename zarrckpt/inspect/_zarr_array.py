"""The read-only ``zarr.Array`` that :meth:`zarrckpt.Checkpoint.__getitem__` returns.

zarr-python decodes the chunks itself; a damaged chunk makes it raise whatever
its codecs raise (``ValueError`` for a crc32c mismatch, others for truncated
or malformed shards). This subclass of ``zarr.Array`` turns every error of a
read, except the ``IndexError`` of an invalid selection, into a
:class:`~zarrckpt.errors.CorruptCheckpointError` naming the checkpoint and the key,
so that ``except ZarrCkptError`` covers a damaged checkpoint read through zarr too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import zarr

from ..errors import CorruptCheckpointError, ZarrCkptError

__all__ = ["checked_array"]

def _checked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def read(self: CheckedArray, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (ZarrCkptError, IndexError):
            raise
        except Exception as e:
            raise CorruptCheckpointError(
                f"checkpoint {self._zarrckpt_path!r}, key {self._zarrckpt_key!r}: zarr could "
                f"not read the stored array (damaged chunk?): {type(e).__name__}: {e}"
            ) from e

    return read


class CheckedArray(zarr.Array):  # type: ignore[misc]
    """A ``zarr.Array`` whose reads raise CorruptCheckpointError on damaged data."""

    _zarrckpt_path: str
    _zarrckpt_key: str

    __getitem__ = _checked(zarr.Array.__getitem__)
    __array__ = _checked(zarr.Array.__array__)
    get_basic_selection = _checked(zarr.Array.get_basic_selection)
    get_orthogonal_selection = _checked(zarr.Array.get_orthogonal_selection)
    get_mask_selection = _checked(zarr.Array.get_mask_selection)
    get_coordinate_selection = _checked(zarr.Array.get_coordinate_selection)
    get_block_selection = _checked(zarr.Array.get_block_selection)


def checked_array(array: zarr.Array, path: str, key: str) -> CheckedArray:
    """``array`` as a :class:`CheckedArray` whose errors name ``path`` and ``key``."""
    out = CheckedArray(array._async_array)
    # zarr.Array is a frozen dataclass
    object.__setattr__(out, "_zarrckpt_path", path)
    object.__setattr__(out, "_zarrckpt_key", key)
    return out
