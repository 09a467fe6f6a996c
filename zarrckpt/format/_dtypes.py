"""torch dtype <-> numpy dtype <-> zarr v3 data type, and zero-copy views.

bfloat16 and the float8 types have no native numpy dtype; ml_dtypes provides
them and the zarr plug-in (:mod:`zarrckpt._zarr_dtypes`) makes them real zarr
data types. Tensors are viewed as numpy arrays without copying: a bfloat16
tensor is reinterpreted as int16, handed to numpy, and viewed as
``ml_dtypes.bfloat16``.

This module imports neither torch nor ml_dtypes: the table holds names, and
:attr:`DTypeInfo.torch_dtype`, :attr:`DTypeInfo.carrier` and
:attr:`DTypeInfo.numpy_dtype` resolve them on first use, so reading a
checkpoint's metadata (``zarrckpt ls``, ``info``, ``tree``) stays torch-free
and does not pay the half second ml_dtypes takes to import.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UnsupportedValueError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BY_TORCH",
    "BY_ZARR",
    "DTypeInfo",
    "info_for_torch",
    "info_for_zarr",
    "numpy_as_tensor",
    "tensor_as_numpy",
    "torch_dtype_name",
]


@dataclass(frozen=True)
class DTypeInfo:
    """How one torch dtype is stored.

    Attributes
    ----------
    torch_name
        Name of the torch dtype (``torch.<name>``).
    numpy_name
        numpy dtype name, or the ``ml_dtypes`` attribute for the types numpy lacks.
    zarr_name
        zarr v3 ``data_type``.
    carrier_name
        Integer torch dtype of the same width used for zero-copy
        reinterpretation, or None when ``torch.Tensor.numpy()`` supports the
        dtype directly.
    fill_value
        zarr v3 JSON fill value for zero.
    itemsize
        Bytes per element.
    """

    torch_name: str
    numpy_name: str
    zarr_name: str
    carrier_name: str | None
    fill_value: Any
    itemsize: int

    @functools.cached_property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        import torch

        dtype: torch.dtype = getattr(torch, self.torch_name)
        return dtype

    @functools.cached_property
    def carrier(self) -> torch.dtype | None:
        """The integer torch dtype used to reinterpret the bits, or None."""
        if self.carrier_name is None:
            return None
        import torch

        dtype: torch.dtype = getattr(torch, self.carrier_name)
        return dtype

    @functools.cached_property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype (imports ml_dtypes for bfloat16 and the float8 types)."""
        if self.numpy_name in _ML_DTYPES:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, self.numpy_name))
        return np.dtype(self.numpy_name)


_ML_DTYPES = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})


def _info(
    name: str, itemsize: int, fill_value: Any, carrier: str | None = None, numpy_name: str = ""
) -> DTypeInfo:
    return DTypeInfo(name, numpy_name or name, name, carrier, fill_value, itemsize)


_TABLE: tuple[DTypeInfo, ...] = (
    _info("float32", 4, 0.0),
    _info("float64", 8, 0.0),
    _info("float16", 2, 0.0),
    _info("bfloat16", 2, 0.0, "int16"),
    _info("float8_e4m3fn", 1, 0.0, "uint8"),
    _info("float8_e5m2", 1, 0.0, "uint8"),
    _info("int8", 1, 0),
    _info("int16", 2, 0),
    _info("int32", 4, 0),
    _info("int64", 8, 0),
    _info("uint8", 1, 0),
    _info("uint16", 2, 0),
    _info("uint32", 4, 0),
    _info("uint64", 8, 0),
    _info("bool", 1, False),
    _info("complex64", 8, [0.0, 0.0]),
    _info("complex128", 16, [0.0, 0.0]),
)

BY_ZARR: dict[str, DTypeInfo] = {i.zarr_name: i for i in _TABLE}


@functools.cache
def _by_torch() -> dict[torch.dtype, DTypeInfo]:
    return {i.torch_dtype: i for i in _TABLE}


def __getattr__(name: str) -> Any:
    """``BY_TORCH`` (keyed by torch dtypes) is built on first use: it imports torch."""
    if name == "BY_TORCH":
        return _by_torch()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    BY_TORCH: dict[torch.dtype, DTypeInfo]


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the name stored in the attributes)."""
    return str(dtype).removeprefix("torch.")


def info_for_torch(dtype: torch.dtype, *, key: str = "?", path: str = "?") -> DTypeInfo:
    """Return the storage description of ``dtype`` or raise UnsupportedValueError."""
    by_torch = _by_torch()
    try:
        return by_torch[dtype]
    except KeyError:
        supported = ", ".join(torch_dtype_name(d) for d in by_torch)
        raise UnsupportedValueError(
            f"tensor {key!r} for checkpoint {path!r} has dtype {dtype}, which zarrckpt "
            f"cannot store; supported dtypes: {supported}"
        ) from None


def info_for_zarr(name: str, *, key: str = "?", path: str = "?") -> DTypeInfo:
    """Return the storage description of a zarr data type name."""
    try:
        return BY_ZARR[name]
    except KeyError:
        from ..errors import CorruptCheckpointError

        raise CorruptCheckpointError(
            f"array {key!r} in checkpoint {path!r} has zarr data_type {name!r}; "
            f"expected one of {sorted(BY_ZARR)}"
        ) from None


def tensor_as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (any supported dtype, any strides)."""
    info = _by_torch()[tensor.dtype]
    if info.carrier is None:
        return tensor.detach().numpy()
    return tensor.detach().view(info.carrier).numpy().view(info.numpy_dtype)


def numpy_as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Zero-copy tensor view of a numpy array holding ``dtype``'s bits."""
    import torch

    info = _by_torch()[dtype]
    if info.carrier_name is None:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(np.dtype(info.carrier_name))).view(dtype)
