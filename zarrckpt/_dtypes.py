"""torch dtype <-> numpy dtype <-> zarr v3 data type, and zero-copy views.

bfloat16 and the float8 types have no native numpy dtype; ml_dtypes provides
them and the zarr plug-in (:mod:`zarrckpt._zarr_dtypes`) makes them real zarr
data types. Tensors are viewed as numpy arrays without copying: a bfloat16
tensor is reinterpreted as int16, handed to numpy, and viewed as
``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import torch

from .errors import UnsupportedValueError


@dataclass(frozen=True)
class DTypeInfo:
    """How one torch dtype is stored."""

    torch_dtype: torch.dtype
    numpy_dtype: np.dtype[Any]
    zarr_name: str
    #: integer torch dtype of the same width used for zero-copy reinterpretation,
    #: or None when torch.Tensor.numpy() supports the dtype directly
    carrier: torch.dtype | None
    #: zarr v3 JSON fill value for zero
    fill_value: Any


def _info(
    torch_dtype: torch.dtype,
    numpy_dtype: Any,
    zarr_name: str,
    fill_value: Any,
    carrier: torch.dtype | None = None,
) -> DTypeInfo:
    return DTypeInfo(torch_dtype, np.dtype(numpy_dtype), zarr_name, carrier, fill_value)


_TABLE: tuple[DTypeInfo, ...] = (
    _info(torch.float32, np.float32, "float32", 0.0),
    _info(torch.float64, np.float64, "float64", 0.0),
    _info(torch.float16, np.float16, "float16", 0.0),
    _info(torch.bfloat16, ml_dtypes.bfloat16, "bfloat16", 0.0, torch.int16),
    _info(torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn, "float8_e4m3fn", 0.0, torch.uint8),
    _info(torch.float8_e5m2, ml_dtypes.float8_e5m2, "float8_e5m2", 0.0, torch.uint8),
    _info(torch.int8, np.int8, "int8", 0),
    _info(torch.int16, np.int16, "int16", 0),
    _info(torch.int32, np.int32, "int32", 0),
    _info(torch.int64, np.int64, "int64", 0),
    _info(torch.uint8, np.uint8, "uint8", 0),
    _info(torch.uint16, np.uint16, "uint16", 0),
    _info(torch.uint32, np.uint32, "uint32", 0),
    _info(torch.uint64, np.uint64, "uint64", 0),
    _info(torch.bool, np.bool_, "bool", False),
    _info(torch.complex64, np.complex64, "complex64", [0.0, 0.0]),
    _info(torch.complex128, np.complex128, "complex128", [0.0, 0.0]),
)

_CARRIER_NUMPY: dict[torch.dtype, np.dtype[Any]] = {
    torch.int16: np.dtype(np.int16),
    torch.uint8: np.dtype(np.uint8),
}

BY_TORCH: dict[torch.dtype, DTypeInfo] = {i.torch_dtype: i for i in _TABLE}
BY_ZARR: dict[str, DTypeInfo] = {i.zarr_name: i for i in _TABLE}


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the name stored in the attributes)."""
    return str(dtype).removeprefix("torch.")


def info_for_torch(dtype: torch.dtype, *, key: str = "?", path: str = "?") -> DTypeInfo:
    """Return the storage description of ``dtype`` or raise UnsupportedValueError."""
    try:
        return BY_TORCH[dtype]
    except KeyError:
        supported = ", ".join(torch_dtype_name(d) for d in BY_TORCH)
        raise UnsupportedValueError(
            f"tensor {key!r} for checkpoint {path!r} has dtype {dtype}, which zarrckpt "
            f"cannot store; supported dtypes: {supported}"
        ) from None


def info_for_zarr(name: str, *, key: str = "?", path: str = "?") -> DTypeInfo:
    """Return the storage description of a zarr data type name."""
    try:
        return BY_ZARR[name]
    except KeyError:
        from .errors import CorruptCheckpointError

        raise CorruptCheckpointError(
            f"array {key!r} in checkpoint {path!r} has zarr data_type {name!r}; "
            f"expected one of {sorted(BY_ZARR)}"
        ) from None


def tensor_as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (any supported dtype, any strides)."""
    info = BY_TORCH[tensor.dtype]
    if info.carrier is None:
        return tensor.detach().numpy()
    return tensor.detach().view(info.carrier).numpy().view(info.numpy_dtype)


def numpy_as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Zero-copy tensor view of a numpy array holding ``dtype``'s bits."""
    info = BY_TORCH[dtype]
    if info.carrier is None:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(_CARRIER_NUMPY[info.carrier])).view(dtype)
