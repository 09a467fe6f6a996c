"""zarr-python data-type plug-in for ``bfloat16``, ``float8_e4m3fn`` and ``float8_e5m2``.

This module is part of the ``zarrckpt`` distribution but lives at the top level
(not inside the ``zarrckpt`` package) on purpose: importing it must not import
``zarrckpt/__init__`` and therefore never imports torch.  It depends only on
numpy, ml_dtypes and zarr.  ``zarrckpt._zarr_dtypes`` re-exports everything.

The three zarr v3 data types are the ones of the zarr-extensions registry
(``data-types/bfloat16``, ``data-types/float8_e4m3fn``,
``data-types/float8_e5m2``).  Arrays are backed by the ml_dtypes numpy dtypes.

Fill values are encoded in JSON as for the core IEEE 754 types of the zarr v3
spec:

* a finite value is written as a JSON number holding the exact value
  (``0.0``, ``-0.0``, ``1.5``, ``448.0``; every value of these types is exactly
  representable as a binary64 number, so the number round-trips bit-exactly);
* ``"Infinity"`` / ``"-Infinity"`` (not for ``float8_e4m3fn``, which has no
  infinity);
* the canonical NaN (bfloat16 ``0x7fc0``, float8_e4m3fn ``0x7f``,
  float8_e5m2 ``0x7e``) is written as ``"NaN"``;
* any other NaN is written as a hex string of the bit pattern, most significant
  (sign) bit first, zero-padded to the type's width: ``"0xffc1"``, ``"0xff"``.

On reading, JSON numbers (integers or floats, rounded to nearest, ties to even),
the three special strings and hex strings of 1 to 2*itemsize hex digits are
accepted.  Only zarr format 3 is supported.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypeGuard, cast, overload

import ml_dtypes
import numpy as np
from zarr.core.dtype.common import DataTypeValidationError, HasEndianness, HasItemSize
from zarr.core.dtype.npy.common import endianness_to_numpy_str, get_endianness_from_numpy_dtype
from zarr.core.dtype.wrapper import ZDType

if TYPE_CHECKING:
    from zarr.core.common import JSON, ZarrFormat
    from zarr.core.dtype.common import DTypeJSON
    from zarr.core.dtype.wrapper import TBaseDType

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

#: The ml_dtypes scalar types (usable wherever numpy accepts a dtype).
BFLOAT16: type[np.generic] = ml_dtypes.bfloat16
FLOAT8_E4M3FN: type[np.generic] = ml_dtypes.float8_e4m3fn
FLOAT8_E5M2: type[np.generic] = ml_dtypes.float8_e5m2

_HEX_RE = re.compile(r"0x[0-9a-fA-F]+")
_finfo: Any = ml_dtypes.finfo  # untyped in ml_dtypes


def _unsupported_format(name: str, zarr_format: object) -> ValueError:
    """Build the error raised when zarr asks for a format other than v3."""
    return ValueError(
        f"The zarr data type {name!r} (zarrckpt plug-in) exists only in zarr format 3; "
        f"got zarr_format={zarr_format!r}. Create the array with zarr_format=3."
    )


@dataclass(frozen=True, kw_only=True)
class _MLDtypesFloat(ZDType[np.dtype[Any], np.generic], HasItemSize):
    """Base class of the ml_dtypes-backed floating-point zarr v3 data types.

    Subclasses set the class variables below; instances carry no configuration
    (``BFloat16`` adds an ``endianness`` field for the ``bytes`` codec).

    Attributes
    ----------
    dtype_cls : ClassVar[type]
        The numpy dtype class of the ml_dtypes type.
    _zarr_v3_name : ClassVar[str]
        The zarr v3 ``data_type`` name.
    _scalar_type : ClassVar[type[np.generic]]
        The ml_dtypes scalar type.
    _uint_type : ClassVar[type[np.unsignedinteger]]
        Unsigned integer type of the same width, used for bit patterns.
    _nan_bits : ClassVar[int]
        Bit pattern of the NaN that the JSON constant ``"NaN"`` denotes.
    _has_inf : ClassVar[bool]
        Whether the type can represent infinities.
    """

    _scalar_type: ClassVar[type[np.generic]]
    _uint_type: ClassVar[type[np.unsignedinteger[Any]]]
    _nan_bits: ClassVar[int]
    _has_inf: ClassVar[bool]

    # ------------------------------------------------------------------ dtype
    @classmethod
    def from_native_dtype(cls, dtype: TBaseDType) -> Self:
        """Create an instance from a numpy dtype.

        Parameters
        ----------
        dtype : numpy.dtype
            The numpy dtype; must be the ml_dtypes dtype of this class.

        Returns
        -------
        Self
            The zarr data type.

        Raises
        ------
        DataTypeValidationError
            If ``dtype`` is not the ml_dtypes dtype of this class.
        """
        if cls._check_native_dtype(dtype):
            return cls()
        raise DataTypeValidationError(
            f"Invalid data type: {dtype!r}. Expected {np.dtype(cls._scalar_type)!r}."
        )

    def to_native_dtype(self) -> np.dtype[Any]:
        """Return the ml_dtypes numpy dtype.

        Returns
        -------
        numpy.dtype
            The (native byte order) ml_dtypes dtype.
        """
        return np.dtype(self._scalar_type)

    @classmethod
    def _check_json_v3(cls, data: DTypeJSON) -> TypeGuard[str]:
        """Tell whether ``data`` is the zarr v3 JSON form of this data type.

        Both the plain name and ``{"name": ...}`` with an empty or absent
        configuration are accepted, as the zarr-extensions schema allows.

        Parameters
        ----------
        data : DTypeJSON
            The ``data_type`` member of a zarr v3 array metadata document.

        Returns
        -------
        bool
            True when ``data`` names this data type.
        """
        if data == cls._zarr_v3_name:
            return True
        if isinstance(data, dict) and data.get("name") == cls._zarr_v3_name:
            extra = set(data) - {"name", "configuration"}
            return not extra and data.get("configuration", {}) == {}
        return False

    @classmethod
    def _from_json_v2(cls, data: DTypeJSON) -> Self:
        """Reject zarr v2 metadata: these data types are v3 only.

        Parameters
        ----------
        data : DTypeJSON
            The v2 ``dtype`` member.

        Raises
        ------
        DataTypeValidationError
            Always (so that zarr's registry goes on with the other data types).
        """
        raise DataTypeValidationError(
            f"{cls._zarr_v3_name!r} (zarrckpt plug-in) has no zarr format 2 encoding; got {data!r}."
        )

    @classmethod
    def _from_json_v3(cls, data: DTypeJSON) -> Self:
        """Create an instance from zarr v3 JSON.

        Parameters
        ----------
        data : DTypeJSON
            The ``data_type`` member.

        Returns
        -------
        Self
            The zarr data type.

        Raises
        ------
        DataTypeValidationError
            If ``data`` does not name this data type.
        """
        if cls._check_json_v3(data):
            return cls()
        raise DataTypeValidationError(
            f"Invalid JSON representation of {cls.__name__}. Got {data!r}, "
            f"expected {cls._zarr_v3_name!r}."
        )

    @overload
    def to_json(self, zarr_format: Literal[2]) -> Any: ...

    @overload
    def to_json(self, zarr_format: Literal[3]) -> str: ...

    def to_json(self, zarr_format: ZarrFormat) -> Any:
        """Serialize the data type for array metadata.

        Parameters
        ----------
        zarr_format : {2, 3}
            The zarr format version; only 3 is supported.

        Returns
        -------
        str
            The zarr v3 data type name.

        Raises
        ------
        ValueError
            If ``zarr_format`` is not 3.
        """
        if zarr_format == 3:
            return self._zarr_v3_name
        raise _unsupported_format(self._zarr_v3_name, zarr_format)

    @property
    def item_size(self) -> int:
        """int: The size of one element in bytes."""
        return int(np.dtype(self._scalar_type).itemsize)

    # ---------------------------------------------------------------- scalars
    def _bits_to_scalar(self, bits: int) -> np.generic:
        """Return the scalar whose bit pattern is ``bits``."""
        return cast("np.generic", np.array(bits, dtype=self._uint_type).view(self._scalar_type)[()])

    def _scalar_to_bits(self, value: np.generic) -> int:
        """Return the bit pattern of a scalar of this type."""
        return int(np.array(value, dtype=self._scalar_type).view(self._uint_type)[()])

    def _from_float(self, value: float) -> np.generic:
        """Round a Python float to this type (to nearest, ties to even).

        ml_dtypes converts a float64 to these types through float32, which
        rounds twice; converting a round-to-odd float32 instead is exact
        because float32 carries at least two more significand bits.

        Parameters
        ----------
        value : float
            The value to convert.

        Returns
        -------
        numpy.generic
            The rounded scalar; NaN becomes the canonical NaN.

        Raises
        ------
        ValueError
            If the value is an infinity or overflows and the type has no
            infinity (``float8_e4m3fn``).
        """
        if math.isnan(value):
            return self._bits_to_scalar(self._nan_bits)
        if math.isinf(value) and not self._has_inf:
            raise ValueError(
                f"{value!r} is not representable in {self._zarr_v3_name!r}, which has no infinity."
            )
        f32_max = 3.4028234663852886e38
        f32 = np.float32(value if abs(value) <= f32_max else math.copysign(math.inf, value))
        inexact = math.isfinite(float(f32)) and float(f32) != value
        if inexact and int(np.array(f32).view(np.uint32)) & 1 == 0:
            # round to odd: of the two float32 neighbours of value, take the odd one
            toward = np.float32(math.inf if value > float(f32) else -math.inf)
            f32 = np.nextafter(f32, toward)
        result = cast("np.generic", np.array(f32, dtype=np.float32).astype(self._scalar_type)[()])
        if math.isfinite(value) and not self._has_inf and np.isnan(result):
            raise ValueError(
                f"{value!r} overflows {self._zarr_v3_name!r} (largest finite value "
                f"{float(_finfo(self._scalar_type).max)!r}; the type has no infinity)."
            )
        return result

    def _from_string(self, data: str) -> np.generic:
        """Parse the JSON string form of a value.

        Parameters
        ----------
        data : str
            ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` or a ``"0x..."`` hex
            bit pattern.

        Returns
        -------
        numpy.generic
            The scalar.

        Raises
        ------
        ValueError
            If the string is not one of these forms or not representable.
        """
        if data == "NaN":
            return self._bits_to_scalar(self._nan_bits)
        if data in ("Infinity", "-Infinity"):
            if not self._has_inf:
                raise ValueError(
                    f"{data!r} is not a valid fill value for {self._zarr_v3_name!r}, "
                    "which has no infinity."
                )
            return self._from_float(float(data.replace("Infinity", "inf")))
        width = 2 * self.item_size
        if _HEX_RE.fullmatch(data) and len(data) - 2 <= width:
            return self._bits_to_scalar(int(data[2:], 16))
        raise ValueError(
            f"Invalid fill value {data!r} for {self._zarr_v3_name!r}: expected a number, "
            f'"NaN", "Infinity", "-Infinity" or a hex bit pattern "0x" + {width} hex digits.'
        )

    def _check_scalar(self, data: object) -> bool:
        """Tell whether ``data`` can be cast to a scalar of this type.

        Parameters
        ----------
        data : object
            A candidate value.

        Returns
        -------
        bool
            True for real numbers (Python or numpy, including ml_dtypes
            scalars) and for the JSON string forms of values.
        """
        if isinstance(data, bool | np.bool_):
            return False
        if isinstance(data, str):
            try:
                self._from_string(data)
            except ValueError:
                return False
            return True
        if isinstance(data, np.generic):
            # numpy ints and floats, and any ml_dtypes float (bfloat16, float8_*, ...)
            return isinstance(data, np.integer | np.floating) or (
                type(data).__module__ == "ml_dtypes" and np.dtype(type(data)).kind in "fV"
            )
        return isinstance(data, int | float)

    def cast_scalar(self, data: object) -> np.generic:
        """Cast a value to a scalar of this type.

        A scalar of this very type is returned unchanged (bit-exact, NaN
        payloads and negative zero kept); other numbers are rounded to nearest,
        ties to even; strings take the JSON forms (``"NaN"``, ``"0x7fc0"``...).

        Parameters
        ----------
        data : object
            The value.

        Returns
        -------
        numpy.generic
            The ml_dtypes scalar.

        Raises
        ------
        TypeError
            If ``data`` is not a real number or a JSON string form.
        ValueError
            If the value is not representable (e.g. infinity in float8_e4m3fn).
        """
        if isinstance(data, self._scalar_type):
            return data
        if isinstance(data, str):
            if data not in ("NaN", "Infinity", "-Infinity") and not _HEX_RE.fullmatch(data):
                raise TypeError(
                    f"Cannot convert {data!r} to a {self._zarr_v3_name} scalar: expected "
                    '"NaN", "Infinity", "-Infinity" or a hex bit pattern such as "0x7fc0".'
                )
            return self._from_string(data)
        if not self._check_scalar(data):
            raise TypeError(
                f"Cannot convert object {data!r} with type {type(data)} to a scalar "
                f"compatible with the data type {self}."
            )
        if isinstance(data, int | np.integer):
            try:
                return self._from_float(float(data))
            except OverflowError:
                return self._from_float(math.inf if int(data) > 0 else -math.inf)
        return self._from_float(float(data))  # type: ignore[arg-type]

    def default_scalar(self) -> np.generic:
        """Return the default fill value, positive zero.

        Returns
        -------
        numpy.generic
            ``0`` of this type.
        """
        return self._bits_to_scalar(0)

    def from_json_scalar(self, data: JSON, *, zarr_format: ZarrFormat) -> np.generic:
        """Decode a fill value from array metadata.

        Parameters
        ----------
        data : JSON
            A JSON number, ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` or a hex
            bit pattern such as ``"0x7fc0"``.
        zarr_format : {2, 3}
            The zarr format version; only 3 is supported.

        Returns
        -------
        numpy.generic
            The ml_dtypes scalar.

        Raises
        ------
        TypeError
            If ``data`` is not a number or a string.
        ValueError
            If ``data`` is an invalid string or not representable, or
            ``zarr_format`` is not 3.
        """
        if zarr_format != 3:
            raise _unsupported_format(self._zarr_v3_name, zarr_format)
        if isinstance(data, str):
            return self._from_string(data)
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise TypeError(
                f"Invalid fill value {data!r} for {self._zarr_v3_name!r}: expected a JSON "
                'number, "NaN", "Infinity", "-Infinity" or a hex string.'
            )
        return self.cast_scalar(data)

    def to_json_scalar(self, data: object, *, zarr_format: ZarrFormat) -> float | str:
        """Encode a fill value for array metadata.

        Parameters
        ----------
        data : object
            The value; cast with :meth:`cast_scalar` first.
        zarr_format : {2, 3}
            The zarr format version; only 3 is supported.

        Returns
        -------
        float or str
            A JSON number with the exact value for finite values,
            ``"Infinity"``/``"-Infinity"``, ``"NaN"`` for the canonical NaN or
            a zero-padded hex bit pattern for any other NaN.

        Raises
        ------
        ValueError
            If ``zarr_format`` is not 3.
        """
        if zarr_format != 3:
            raise _unsupported_format(self._zarr_v3_name, zarr_format)
        scalar = self.cast_scalar(data)
        value = float(cast("Any", scalar))
        if math.isnan(value):
            bits = self._scalar_to_bits(scalar)
            if bits == self._nan_bits:
                return "NaN"
            return f"0x{bits:0{2 * self.item_size}x}"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value


@dataclass(frozen=True, kw_only=True)
class BFloat16(_MLDtypesFloat, HasEndianness):
    """The zarr v3 ``bfloat16`` data type (zarr-extensions), backed by ``ml_dtypes.bfloat16``.

    1 sign bit, 8 exponent bits (bias 127), 7 mantissa bits; IEEE 754-like with
    NaN, infinities and subnormals.  ``"NaN"`` denotes ``0x7fc0``.

    Attributes
    ----------
    endianness : {"little", "big"}
        The byte order, as for zarr's ``float16``; the ``bytes`` codec sets it.
    """

    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name: ClassVar[Literal["bfloat16"]] = "bfloat16"
    _scalar_type = ml_dtypes.bfloat16
    _uint_type = np.uint16
    _nan_bits = 0x7FC0
    _has_inf = True

    def to_native_dtype(self) -> np.dtype[Any]:
        """Return the ml_dtypes bfloat16 dtype in this instance's byte order.

        Returns
        -------
        numpy.dtype
            ``numpy.dtype(ml_dtypes.bfloat16)`` itself for the machine's byte
            order, else its byte-swapped variant (numpy reads and casts such
            arrays correctly; its repr shows ``>V2``).
        """
        native: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        if self.endianness == sys.byteorder:
            return native
        return native.newbyteorder(endianness_to_numpy_str(self.endianness))

    @classmethod
    def from_native_dtype(cls, dtype: TBaseDType) -> Self:
        """Create an instance from a numpy dtype.

        Parameters
        ----------
        dtype : numpy.dtype
            ``numpy.dtype(ml_dtypes.bfloat16)`` in either byte order.

        Returns
        -------
        BFloat16
            The zarr data type.

        Raises
        ------
        DataTypeValidationError
            If ``dtype`` is not the ml_dtypes bfloat16 dtype.
        """
        if cls._check_native_dtype(dtype):
            return cls(endianness=get_endianness_from_numpy_dtype(dtype))
        raise DataTypeValidationError(
            f"Invalid data type: {dtype!r}. Expected {np.dtype(ml_dtypes.bfloat16)!r}."
        )


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FN(_MLDtypesFloat):
    """The zarr v3 ``float8_e4m3fn`` data type, backed by ``ml_dtypes.float8_e4m3fn``.

    1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, NaN
    is ``0bS1111111`` (``"NaN"`` denotes ``0x7f``), subnormals; largest finite
    value 448.  ``"Infinity"``/``"-Infinity"`` are rejected as fill values.
    """

    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fn))
    _zarr_v3_name: ClassVar[Literal["float8_e4m3fn"]] = "float8_e4m3fn"
    _scalar_type = ml_dtypes.float8_e4m3fn
    _uint_type = np.uint8
    _nan_bits = 0x7F
    _has_inf = False


@dataclass(frozen=True, kw_only=True)
class Float8E5M2(_MLDtypesFloat):
    """The zarr v3 ``float8_e5m2`` data type, backed by ``ml_dtypes.float8_e5m2``.

    1 sign bit, 5 exponent bits (bias 15), 2 mantissa bits; IEEE 754-like with
    NaN, infinities and subnormals.  ``"NaN"`` denotes ``0x7e``.
    """

    dtype_cls = type(np.dtype(ml_dtypes.float8_e5m2))
    _zarr_v3_name: ClassVar[Literal["float8_e5m2"]] = "float8_e5m2"
    _scalar_type = ml_dtypes.float8_e5m2
    _uint_type = np.uint8
    _nan_bits = 0x7E
    _has_inf = True


#: The plug-in's data types, keyed by zarr v3 name.
ZARRCKPT_ZARR_DTYPES: dict[str, type[_MLDtypesFloat]] = {
    cls._zarr_v3_name: cls for cls in (BFloat16, Float8E4M3FN, Float8E5M2)
}


def register_zarr_dtypes() -> None:
    """Register the plug-in's data types in zarr-python's data type registry.

    Idempotent: registering again is a no-op.  Afterwards plain zarr-python
    opens arrays whose ``data_type`` is ``bfloat16``, ``float8_e4m3fn`` or
    ``float8_e5m2`` and creates them from the ml_dtypes numpy dtypes or names.
    """
    from zarr.core.dtype import data_type_registry

    for name, cls in ZARRCKPT_ZARR_DTYPES.items():
        data_type_registry.register(name, cls)
