"""zarrckpt: PyTorch training checkpoints as zarr v3 arrays.

Every global tensor of a state dict is one zarr v3 array whose chunks follow
the shard boundaries; checkpoints are committed atomically, verified by
crc32c, free of pickle by default, and open offline in zarr, dask and
tensorstore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from . import errors
from ._load_result import LoadResult
from ._zarr_dtypes import register_zarr_dtypes
from .api import async_save, load, save
from .inspect import Checkpoint, open

register_zarr_dtypes()

_LAZY = {
    "ZarrStorageReader": ("dcp", "ZarrStorageReader"),
    "ZarrStorageWriter": ("dcp", "ZarrStorageWriter"),
    "convert": ("convert", None),
}


def __getattr__(name: str) -> Any:
    """Import the DCP plug-ins and the converters on first use (they pull in
    torch.distributed.checkpoint, which costs seconds at import time)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'zarrckpt' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from . import convert
    from .dcp import ZarrStorageReader, ZarrStorageWriter

__all__ = [
    "__version__",
    "async_save",
    "Checkpoint",
    "convert",
    "errors",
    "load",
    "LoadResult",
    "open",
    "register_zarr_dtypes",
    "save",
    "ZarrStorageReader",
    "ZarrStorageWriter",
]
