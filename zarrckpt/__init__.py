"""zarrckpt: PyTorch training checkpoints as zarr v3 arrays.

Every global tensor of a state dict is one zarr v3 array whose chunks follow
the shard boundaries; checkpoints are committed atomically, verified by
crc32c, free of pickle by default, and open offline in zarr, dask and
tensorstore.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors
from ._zarr_dtypes import register_zarr_dtypes
from .api import async_save, load, save
from .dcp import ZarrStorageReader, ZarrStorageWriter
from .inspect import Checkpoint, open

register_zarr_dtypes()

__all__ = [
    "__version__",
    "async_save",
    "Checkpoint",
    "errors",
    "load",
    "open",
    "register_zarr_dtypes",
    "save",
    "ZarrStorageReader",
    "ZarrStorageWriter",
]
