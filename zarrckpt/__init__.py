"""zarrckpt: PyTorch training checkpoints as zarr v3 arrays.

Every global tensor of a state dict is one zarr v3 array whose chunks follow
the shard boundaries; checkpoints are committed atomically, verified by
crc32c, free of pickle by default, and open offline in zarr, dask and
tensorstore.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from . import errors
from ._version import __version__

#: public names imported on first use: ``import zarrckpt`` itself imports
#: neither torch nor zarr (the command line and offline inspection need
#: neither), ``zarrckpt.save`` imports torch when it is first looked up.
_LAZY = {
    "save": ("api", "save"),
    "load": ("api", "load"),
    "async_save": ("api", "async_save"),
    "LoadResult": ("_load_result", "LoadResult"),
    "open": ("inspect", "open"),
    "Checkpoint": ("inspect", "Checkpoint"),
    "register_zarr_dtypes": ("_zarr_dtypes", "register_zarr_dtypes"),
    "ZarrStorageReader": ("dcp", "ZarrStorageReader"),
    "ZarrStorageWriter": ("dcp", "ZarrStorageWriter"),
    "convert": ("convert", None),
    "CheckpointManager": ("manager._manager", "CheckpointManager"),
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (see ``_LAZY``)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'zarrckpt' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register_zarr_dtypes_with_zarr() -> None:
    """Make zarr know bfloat16 and float8 once it is imported, without importing it.

    If zarr is already imported the data types are registered now; otherwise the
    import hook of ``_zarrckpt_zarr_autoload`` (torch- and zarr-free) registers
    them right after ``import zarr``, even when ``ZARRCKPT_NO_ZARR_AUTOLOAD``
    turned the automatic hook off: importing zarrckpt asks for them explicitly.
    """
    if "zarr" in sys.modules:
        from ._zarr_dtypes import register_zarr_dtypes

        register_zarr_dtypes()
    else:
        import _zarrckpt_zarr_autoload

        _zarrckpt_zarr_autoload.install(force=True)


_register_zarr_dtypes_with_zarr()

if TYPE_CHECKING:
    from . import convert
    from ._load_result import LoadResult
    from ._zarr_dtypes import register_zarr_dtypes
    from .api import async_save, load, save
    from .dcp import ZarrStorageReader, ZarrStorageWriter
    from .inspect import Checkpoint, open
    from .manager import CheckpointManager

__all__ = [
    "__version__",
    "async_save",
    "Checkpoint",
    "CheckpointManager",
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
