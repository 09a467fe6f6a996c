"""zarr v3 data types ``bfloat16``, ``float8_e4m3fn`` and ``float8_e5m2`` for zarr-python.

The implementation lives in the top-level module ``_zarrckpt_zarr_dtypes``
(shipped in the same wheel) so that zarr-python, and the import hook that
registers the data types when zarr is imported, can load it without importing
``zarrckpt`` and therefore torch.  This module re-exports it, and registers
the data types when it is imported (importing the plug-in imports zarr, and the
import hook leaves the registration to whoever imported the plug-in); see
``docs/dtypes.md``.
"""

from __future__ import annotations

from _zarrckpt_zarr_dtypes import (
    BFLOAT16,
    FLOAT8_E4M3FN,
    FLOAT8_E5M2,
    ZARRCKPT_ZARR_DTYPES,
    BFloat16,
    Float8E4M3FN,
    Float8E5M2,
    register_zarr_dtypes,
)

__all__ = [
    "BFLOAT16",
    "FLOAT8_E4M3FN",
    "FLOAT8_E5M2",
    "ZARRCKPT_ZARR_DTYPES",
    "BFloat16",
    "Float8E4M3FN",
    "Float8E5M2",
    "register_zarr_dtypes",
]

register_zarr_dtypes()
