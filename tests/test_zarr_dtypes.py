"""Tests of the zarr data-type plug-in (bfloat16, float8_e4m3fn, float8_e5m2).

Every comparison is on bit patterns, so NaN payloads and the sign of zero count.
Arrays written by zarr-python are read back by zarr-python in-process, by plain
zarr-python in a fresh interpreter that never imports zarrckpt (which proves
that the installed import hook registers the data types) and by tensorstore;
arrays written by tensorstore are read by zarr-python.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import DataTypeValidationError
from zarr.core.metadata import ArrayV3Metadata

import _zarrckpt_zarr_autoload
import _zarrckpt_zarr_dtypes as zd

zd.register_zarr_dtypes()

# zarr-python compares each chunk with the fill value before writing it; for
# NaNs in ml_dtypes arrays numpy warns about that comparison (harmless).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in equal:RuntimeWarning")


@dataclass(frozen=True)
class Case:
    """One data type under test."""

    name: str
    scalar: type[np.generic]
    cls: type[Any]
    uint: type[np.unsignedinteger[Any]]
    special_bits: tuple[int, ...]  # nan(s), inf, -0, subnormals, max finite...
    nan_bits: int
    fill: float  # non-zero fill value used by the array tests
    fill_bits: int


CASES = [
    Case(
        "bfloat16",
        ml_dtypes.bfloat16,
        zd.BFloat16,
        np.uint16,
        # NaN, -NaN, NaN with payload, +inf, -inf, +0, -0, smallest/largest
        # subnormal (+/-), smallest normal, max finite, -max finite, 1.0
        (0x7FC0, 0xFFC0, 0x7F81, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x807F, 0x007F)
        + (0x0080, 0x7F7F, 0xFF7F, 0x3F80),
        0x7FC0,
        -2.5,
        0xC020,
    ),
    Case(
        "float8_e4m3fn",
        ml_dtypes.float8_e4m3fn,
        zd.Float8E4M3FN,
        np.uint8,
        # NaN, -NaN (no infinities), +0, -0, smallest/largest subnormal (+/-),
        # smallest normal, max finite (448), -max finite, 1.0
        (0x7F, 0xFF, 0x00, 0x80, 0x01, 0x87, 0x07, 0x08, 0x7E, 0xFE, 0x38),
        0x7F,
        -2.5,
        0xC2,
    ),
    Case(
        "float8_e5m2",
        ml_dtypes.float8_e5m2,
        zd.Float8E5M2,
        np.uint8,
        # NaN, other NaNs, +inf, -inf, +0, -0, smallest/largest subnormal
        # (+/-), smallest normal, max finite (57344), -max finite, 1.0
        (0x7E, 0x7D, 0x7F, 0xFF, 0x7C, 0xFC, 0x00, 0x80, 0x01, 0x83, 0x03, 0x04, 0x7B, 0xFB)
        + (0x3C,),
        0x7E,
        -2.5,
        0xC1,
    ),
]
IDS = [c.name for c in CASES]

SHAPE = (7, 5)
CHUNKS = (3, 5)
WRITTEN_ROWS = 5  # rows 5..6 stay unwritten: half of chunk 1 and all of chunk 2


def bits(a: Any, uint: type[np.unsignedinteger[Any]]) -> np.ndarray[Any, Any]:
    """Bit patterns of an array (native byte order) as unsigned integers."""
    a = np.asarray(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.array(a, order="C").view(uint)


def sample_bits(case: Case) -> np.ndarray[Any, Any]:
    """A (7, 5) array of bit patterns: all special values, then a deterministic mix."""
    rng = np.random.default_rng(1234)
    n = SHAPE[0] * SHAPE[1]
    info = np.iinfo(case.uint)
    out = rng.integers(0, int(info.max) + 1, size=n, dtype=np.uint64).astype(case.uint)
    out[: len(case.special_bits)] = case.special_bits
    return out.reshape(SHAPE)


def expected_bits(case: Case) -> np.ndarray[Any, Any]:
    """What the (7, 5) array holds after writing its first WRITTEN_ROWS rows."""
    exp = np.full(SHAPE, case.fill_bits, dtype=case.uint)
    exp[:WRITTEN_ROWS] = sample_bits(case)[:WRITTEN_ROWS]
    return exp


def write_with_zarr(case: Case, path: Path) -> None:
    """Write the sample array with zarr-python: bytes(little) + crc32c, fill -2.5."""
    arr = zarr.create_array(
        str(path),
        shape=SHAPE,
        chunks=CHUNKS,
        dtype=case.scalar,
        fill_value=case.fill,
        serializer=BytesCodec(endian="little"),
        compressors=[Crc32cCodec()],
        zarr_format=3,
    )
    data = sample_bits(case).view(case.scalar)
    arr[:WRITTEN_ROWS] = data[:WRITTEN_ROWS]


def ts_spec(path: Path) -> dict[str, Any]:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


# --------------------------------------------------------------- zarr-python


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zarr_roundtrip_bit_exact(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    write_with_zarr(case, path)
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["data_type"] == case.name
    assert meta["fill_value"] == case.fill
    assert meta["codecs"][-1] == {"name": "crc32c"}
    if case.uint is np.uint16:
        assert meta["codecs"][0] == {"name": "bytes", "configuration": {"endian": "little"}}
    else:
        assert meta["codecs"][0]["name"] == "bytes"
    # chunk 2 was never written: it must come from the fill value
    assert sorted(p.name for p in (path / "c").iterdir()) == ["0", "1"]

    back = zarr.open_array(str(path), mode="r")
    assert back.dtype == np.dtype(case.scalar)
    assert isinstance(back.metadata, ArrayV3Metadata)
    assert isinstance(back.metadata.data_type, case.cls)
    got = np.asarray(back[...])
    assert got.dtype == np.dtype(case.scalar)
    np.testing.assert_array_equal(bits(got, case.uint), expected_bits(case))
    assert bits(back.fill_value, case.uint) == case.fill_bits


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_plain_zarr_in_fresh_interpreter_reads_without_zarrckpt(case: Case, tmp_path: Path) -> None:
    """The installed .pth hook registers the types: no zarrckpt (and no torch) import."""
    path = tmp_path / "a.zarr"
    write_with_zarr(case, path)
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import zarr
        a = zarr.open(sys.argv[1], mode="r")
        got = a[...]
        uint = {1: np.uint8, 2: np.uint16}[got.dtype.itemsize]
        print(json.dumps({
            "dtype": str(got.dtype),
            "bits": np.ascontiguousarray(got).view(uint).ravel().tolist(),
            "cls": type(a.metadata.data_type).__module__,
            "zarrckpt_imported": "zarrckpt" in sys.modules,
            "torch_imported": "torch" in sys.modules,
        }))
        """
    )
    env = dict(os.environ)
    env.pop(_zarrckpt_zarr_autoload.DISABLE_ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # keep the source tree off sys.path: only the install counts
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, (
        "plain zarr could not read the array in a fresh interpreter; is zarrckpt installed "
        f"(pip install -e .)?\n{proc.stderr}"
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtype"] == case.name
    assert out["cls"] == "_zarrckpt_zarr_dtypes"
    assert out["zarrckpt_imported"] is False
    assert out["torch_imported"] is False
    np.testing.assert_array_equal(
        np.array(out["bits"], dtype=case.uint).reshape(SHAPE), expected_bits(case)
    )


def test_fresh_interpreter_without_hook_cannot_read(tmp_path: Path) -> None:
    """Control for the test above: with the hook disabled plain zarr fails."""
    path = tmp_path / "a.zarr"
    write_with_zarr(CASES[0], path)
    env = dict(os.environ)
    env[_zarrckpt_zarr_autoload.DISABLE_ENV_VAR] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, zarr; zarr.open(sys.argv[1], mode='r')", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "bfloat16" in proc.stderr


# ---------------------------------------------------------------- tensorstore


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tensorstore_reads_zarr_written_bit_exact(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    write_with_zarr(case, path)
    store = ts.open(ts_spec(path)).result()
    assert store.dtype.numpy_dtype == np.dtype(case.scalar)
    np.testing.assert_array_equal(bits(store.read().result(), case.uint), expected_bits(case))
    assert bits(store.fill_value, case.uint) == case.fill_bits


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zarr_reads_tensorstore_written_bit_exact(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    spec = ts_spec(path) | {
        "metadata": {
            "shape": list(SHAPE),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(CHUNKS)}},
            "data_type": case.name,
            "fill_value": case.fill,
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "crc32c"},
            ],
        },
        "create": True,
    }
    store = ts.open(spec).result()
    data = sample_bits(case).view(case.scalar)
    store[:WRITTEN_ROWS].write(data[:WRITTEN_ROWS]).result()

    back = zarr.open_array(str(path), mode="r")
    assert isinstance(back.metadata, ArrayV3Metadata)
    assert isinstance(back.metadata.data_type, case.cls)
    np.testing.assert_array_equal(bits(back[...], case.uint), expected_bits(case))
    assert bits(back.fill_value, case.uint) == case.fill_bits


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_bit_pattern_roundtrips_zarr_and_tensorstore(case: Case, tmp_path: Path) -> None:
    n = int(np.iinfo(case.uint).max) + 1
    side = 256
    pattern = np.arange(n, dtype=np.uint64).astype(case.uint).reshape(-1, side)
    path = tmp_path / "all.zarr"
    arr = zarr.create_array(
        str(path),
        shape=pattern.shape,
        chunks=(max(1, pattern.shape[0] // 3), side),
        dtype=case.scalar,
        serializer=BytesCodec(endian="little"),
        compressors=[Crc32cCodec()],
    )
    arr[...] = pattern.view(case.scalar)
    np.testing.assert_array_equal(bits(zarr.open_array(str(path))[...], case.uint), pattern)
    got_ts = ts.open(ts_spec(path)).result().read().result()
    np.testing.assert_array_equal(bits(got_ts, case.uint), pattern)


def test_bfloat16_big_endian_roundtrip(tmp_path: Path) -> None:
    pattern = np.array(CASES[0].special_bits, dtype=np.uint16)
    path = tmp_path / "be.zarr"
    arr = zarr.create_array(
        str(path),
        shape=pattern.shape,
        chunks=(4,),
        dtype="bfloat16",
        serializer=BytesCodec(endian="big"),
        compressors=None,
    )
    arr[...] = pattern.view(ml_dtypes.bfloat16)
    assert (path / "c" / "0").read_bytes() == pattern[:4].astype(">u2").tobytes()
    np.testing.assert_array_equal(bits(zarr.open_array(str(path))[...], np.uint16), pattern)
    np.testing.assert_array_equal(
        bits(ts.open(ts_spec(path)).result().read().result(), np.uint16), pattern
    )


# ------------------------------------------------------------ fill-value JSON


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fill_value_json_roundtrip_every_bit_pattern(case: Case) -> None:
    zdt = case.cls()
    n = int(np.iinfo(case.uint).max) + 1
    values = np.arange(n, dtype=np.uint64).astype(case.uint).view(case.scalar)
    for b, v in enumerate(values):
        encoded = zdt.to_json_scalar(v, zarr_format=3)
        text = json.dumps(encoded, allow_nan=False)  # strict JSON: no bare NaN/Infinity
        decoded = zdt.from_json_scalar(json.loads(text), zarr_format=3)
        assert isinstance(decoded, case.scalar)
        assert int(bits(decoded, case.uint)) == b, (b, encoded)
        if math.isnan(float(v)):
            width = 2 * np.dtype(case.uint).itemsize
            assert encoded == ("NaN" if b == case.nan_bits else f"0x{b:0{width}x}")
        elif math.isinf(float(v)):
            assert encoded == ("Infinity" if v > 0 else "-Infinity")
        else:
            assert isinstance(encoded, float)
            assert encoded == float(v)


def _fill_params() -> list[Any]:
    """(case, fill value as written in zarr.json, its bits, what the plug-in writes back)."""
    params = []
    for case in CASES:
        wide = case.uint is np.uint16
        rows: list[tuple[Any, int, Any]] = [
            (0, 0, 0.0),  # an integer JSON number is accepted and written back as 0.0
            (0.0, 0, 0.0),
            (-0.0, 0x8000 if wide else 0x80, -0.0),
            (case.fill, case.fill_bits, case.fill),
            ("NaN", case.nan_bits, "NaN"),
            ("0xffc1" if wide else "0xff", 0xFFC1 if wide else 0xFF, "0xffc1" if wide else "0xff"),
            ("0x0001" if wide else "0x01", 1, float(np.array(1, case.uint).view(case.scalar))),
        ]
        if case.name != "float8_e4m3fn":
            rows.append(("-Infinity", 0xFF80 if wide else 0xFC, "-Infinity"))
        for fill_json, fill_bits, written in rows:
            params.append(
                pytest.param(case, fill_json, fill_bits, written, id=f"{case.name}-{fill_json}")
            )
    return params


@pytest.mark.parametrize(("case", "fill_json", "fill_bits", "written"), _fill_params())
def test_fill_value_json_roundtrips_through_metadata_and_tensorstore(
    case: Case, fill_json: Any, fill_bits: int, written: Any, tmp_path: Path
) -> None:
    expected = np.full(4, fill_bits, case.uint)

    # a zarr.json written by hand, opened by zarr-python and by tensorstore
    path = tmp_path / "h.zarr"
    path.mkdir()
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    doc = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [4],
        "data_type": case.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill_json,
        "codecs": codecs if case.uint is np.uint16 else [{"name": "bytes"}],
    }
    (path / "zarr.json").write_text(json.dumps(doc))
    za = zarr.open_array(str(path), mode="r")
    assert int(bits(za.fill_value, case.uint)) == fill_bits
    np.testing.assert_array_equal(bits(za[...], case.uint), expected)
    assert json.loads(json.dumps(za.metadata.to_dict()["fill_value"])) == written
    ta = ts.open(ts_spec(path)).result()
    np.testing.assert_array_equal(bits(ta.read().result(), case.uint), expected)

    # zarr-python writes the fill value itself; tensorstore reads the same bits
    path2 = tmp_path / "w.zarr"
    zarr.create_array(str(path2), shape=(4,), chunks=(2,), dtype=case.name, fill_value=fill_json)
    on_disk = json.loads((path2 / "zarr.json").read_text())["fill_value"]
    assert on_disk == written
    if isinstance(written, float):
        assert np.signbit(on_disk) == np.signbit(written)
    ta2 = ts.open(ts_spec(path2)).result()
    np.testing.assert_array_equal(bits(ta2.read().result(), case.uint), expected)


def test_tensorstore_written_fill_values_parse_identically(tmp_path: Path) -> None:
    for case in CASES:
        for fill in (0.0, -0.0, 1.5, "NaN", "0x" + "f" * 2 * np.dtype(case.uint).itemsize):
            path = tmp_path / f"{case.name}-{fill}.zarr"
            spec = ts_spec(path) | {
                "metadata": {"shape": [2], "data_type": case.name, "fill_value": fill},
                "create": True,
            }
            store = ts.open(spec).result()
            ts_json = json.loads((path / "zarr.json").read_text())["fill_value"]
            ours = case.cls().from_json_scalar(ts_json, zarr_format=3)
            assert int(bits(ours, case.uint)) == int(bits(store.fill_value, case.uint)), (
                case.name,
                fill,
                ts_json,
            )


def test_e4m3fn_has_no_infinity() -> None:
    zdt = zd.Float8E4M3FN()
    for bad in ("Infinity", "-Infinity", float("inf"), 1e6, 464.0001, -465.0):
        with pytest.raises(ValueError, match="infinity"):
            zdt.cast_scalar(bad)
    with pytest.raises(ValueError, match="infinity"):
        zdt.from_json_scalar("Infinity", zarr_format=3)
    # 464 is the midpoint of 448 (0x7e) and the NaN slot 0x7f: ties to even gives 448
    assert int(bits(zdt.cast_scalar(464.0), np.uint8)) == 0x7E
    assert int(bits(zdt.cast_scalar(-463.9), np.uint8)) == 0xFE


def test_rounding_is_to_nearest_even_without_double_rounding() -> None:
    bf = zd.BFloat16()
    # just above the midpoint of 1.0 and 1.0078125: ml_dtypes alone (via float32) gives 1.0
    assert int(bits(bf.cast_scalar(1 + 2**-8 + 2**-40), np.uint16)) == 0x3F81
    assert int(bits(bf.cast_scalar(1 + 2**-8), np.uint16)) == 0x3F80  # tie -> even
    assert int(bits(bf.cast_scalar(1 + 3 * 2**-8), np.uint16)) == 0x3F82  # tie -> even
    assert int(bits(bf.cast_scalar(-1e300), np.uint16)) == 0xFF80
    e4 = zd.Float8E4M3FN()
    assert int(bits(e4.cast_scalar(1 + 2**-4 + 2**-40), np.uint8)) == 0x39
    assert int(bits(e4.cast_scalar(1 + 2**-4), np.uint8)) == 0x38
    e5 = zd.Float8E5M2()
    assert int(bits(e5.cast_scalar(1e30), np.uint8)) == 0x7C
    assert int(bits(e5.cast_scalar(10**400), np.uint8)) == 0x7C


def test_json_parsing_rules() -> None:
    bf = zd.BFloat16()
    assert int(bits(bf.from_json_scalar("0x7FC1", zarr_format=3), np.uint16)) == 0x7FC1
    assert int(bits(bf.from_json_scalar("0x1", zarr_format=3), np.uint16)) == 0x0001
    assert int(bits(bf.from_json_scalar(3, zarr_format=3), np.uint16)) == 0x4040
    for bad in ("0x12345", "nan", "inf", "1.5", "0xzz", ""):
        with pytest.raises(ValueError):
            bf.from_json_scalar(bad, zarr_format=3)
    for bad_type in (None, True, [1], {"a": 1}):
        with pytest.raises(TypeError):
            bf.from_json_scalar(bad_type, zarr_format=3)
    with pytest.raises(ValueError):
        zd.Float8E5M2().from_json_scalar("0x100", zarr_format=3)


# ----------------------------------------------------- registry and metadata


def test_registration_is_idempotent_and_complete() -> None:
    before = dict(data_type_registry.contents)
    zd.register_zarr_dtypes()
    zd.register_zarr_dtypes()
    assert dict(data_type_registry.contents) == before
    for case in CASES:
        assert data_type_registry.get(case.name) is case.cls
        assert type(data_type_registry.match_dtype(np.dtype(case.scalar))) is case.cls
        assert type(data_type_registry.match_json(case.name, zarr_format=3)) is case.cls
        assert case.cls.from_json({"name": case.name}, zarr_format=3) == case.cls()


def test_entry_points_point_at_torch_free_module() -> None:
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="zarr.data_type")}
    for case in CASES:
        assert eps.get(case.name) == f"_zarrckpt_zarr_dtypes:{case.cls.__name__}"


def test_zarrckpt_reexports_plugin() -> None:
    from zarrckpt import _zarr_dtypes

    assert _zarr_dtypes.BFloat16 is zd.BFloat16
    assert _zarr_dtypes.Float8E4M3FN is zd.Float8E4M3FN
    assert _zarr_dtypes.Float8E5M2 is zd.Float8E5M2
    assert _zarr_dtypes.register_zarr_dtypes is zd.register_zarr_dtypes
    assert _zarr_dtypes.BFLOAT16 is ml_dtypes.bfloat16
    assert _zarr_dtypes.FLOAT8_E4M3FN is ml_dtypes.float8_e4m3fn
    assert _zarr_dtypes.FLOAT8_E5M2 is ml_dtypes.float8_e5m2


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zarr_v2_is_rejected_clearly(case: Case, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="zarr format 3"):
        zarr.create_array(str(tmp_path / "v2"), shape=(2,), dtype=case.scalar, zarr_format=2)
    with pytest.raises(DataTypeValidationError):
        case.cls.from_json({"name": "<f2", "object_codec_id": None}, zarr_format=2)
    # the v2 registry lookup of other types is not disturbed
    assert data_type_registry.match_json({"name": "<f2", "object_codec_id": None}, zarr_format=2)


def test_write_empty_chunks_keeps_negative_zero(tmp_path: Path) -> None:
    """zarr-python drops chunks "equal" to the fill value; -0.0 == 0.0 for ml_dtypes.

    With ``write_empty_chunks=True`` every chunk is stored and bits survive.
    """
    for case in CASES:
        path = tmp_path / case.name
        arr = zarr.create_array(
            str(path),
            shape=(4,),
            chunks=(2,),
            dtype=case.scalar,
            fill_value=0.0,
            config={"write_empty_chunks": True},
        )
        negzero = 0x8000 if case.uint is np.uint16 else 0x80
        arr[...] = np.full(4, negzero, case.uint).view(case.scalar)
        np.testing.assert_array_equal(
            bits(zarr.open_array(str(path))[...], case.uint), np.full(4, negzero, case.uint)
        )


def test_autoload_hook_registers_on_zarr_import(tmp_path: Path) -> None:
    """The hook alone (no .pth, source tree on sys.path) registers on ``import zarr``."""
    repo = Path(_zarrckpt_zarr_autoload.__file__).resolve().parent
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(repo)!r})
        import _zarrckpt_zarr_autoload as h
        h.install(); h.install()
        assert sum(type(f).__name__ == "ZarrDtypesAutoloader" for f in sys.meta_path) == 1
        assert "zarr" not in sys.modules and "numpy" not in sys.modules
        import zarr
        from zarr.core.dtype import data_type_registry as r
        assert r.get("bfloat16").__module__ == "_zarrckpt_zarr_dtypes", r.contents.keys()
        assert zarr.__spec__.loader.__class__.__name__ == "SourceFileLoader"
        assert "torch" not in sys.modules and "zarrckpt" not in sys.modules
        print("ok")
        """
    )
    env = dict(os.environ)
    env[_zarrckpt_zarr_autoload.DISABLE_ENV_VAR] = ""
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_importing_plugin_before_zarr_is_quiet_and_explicit_register_works(tmp_path: Path) -> None:
    """If the plug-in module is imported before zarr, the hook must not warn or fail."""
    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error")
        import _zarrckpt_zarr_dtypes as d  # imports zarr half-way through
        from zarr.core.dtype import data_type_registry as r
        d.register_zarr_dtypes()
        assert r.get("float8_e5m2") is d.Float8E5M2
        print("ok")
        """
    )
    env = dict(os.environ)
    env.pop(_zarrckpt_zarr_autoload.DISABLE_ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""
