"""Bit-exact round trips: every dtype x every kind of tensor, through every reader.

Readers: ``zarrckpt.load`` (in place), ``zarrckpt.open(p).read``,
``open(p).to_dask()[k].compute()``, ``open(p)[k][...]`` (zarr-python),
plain zarr-python in a subprocess that never imports zarrckpt, and
tensorstore's zarr3 driver. Three layouts: plain multi-chunk files, sharded
chunks (``sharding_indexed``) with partial edge chunks and empty inner chunks,
and the default options.

Also: JSON leaves kept exactly, in-place / identity / cast / meta semantics,
stateful objects (a small class, an nn.Module, an optimizer), a property test
over random shapes / dtypes / chunk sizes, and one > 2 GiB tensor.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    DTYPES,
    array_path,
    assert_bits_equal,
    bits_equal,
    digest,
    dtype_name,
    plain_zarr_digests,
    random_tensor,
    save_fast,
    tensorstore_read,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zarrckpt

# ----------------------------------------------------------------- the state dicts

#: save options of the layouts
LAYOUTS: dict[str, dict[str, Any]] = {
    # pieces of ~200 kB, never cut: one shard file whose inner chunks are the pieces,
    # a partial last one
    "plain": {"chunk_bytes": 200_000, "inner_chunk_bytes": 1 << 30},
    # pieces of ~300 kB cut into ~20 kB inner chunks, all in one shard file
    "sharded": {"chunk_bytes": 300_000, "inner_chunk_bytes": 20_000},
    # the object-store layout: one chunk file per piece, each sharded by itself,
    # a partial edge piece with inner chunks wholly outside the array
    "pieces": {"chunk_bytes": 300_000, "inner_chunk_bytes": 20_000, "file_layout": "pieces"},
    "default": {},
}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _big_shape(dtype: torch.dtype) -> tuple[int, int]:
    # > 1 MiB for every dtype; the row count is prime-ish so the last chunk is partial
    return (4100 // _itemsize(dtype) + 7, 300)


def small_kinds(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """0-d, empty, contiguous, non-contiguous, strided, expanded and storage-sharing tensors."""
    base = random_tensor(dtype, (6, 9), seed + 1)
    shared = random_tensor(dtype, (8, 5), seed + 2)
    kinds = {
        "scalar": random_tensor(dtype, (), seed),
        "empty1": random_tensor(dtype, (0,), seed),
        "empty3": random_tensor(dtype, (4, 0, 3), seed),
        "small": random_tensor(dtype, (5, 7), seed + 3),
        "transposed": base.t(),
        "strided": random_tensor(dtype, (8, 10, 3), seed + 4)[1::3, ::2, 2],
        "permuted": random_tensor(dtype, (3, 4, 5), seed + 5).permute(2, 0, 1),
        "expanded": random_tensor(dtype, (1, 5), seed + 6).expand(4, 5),
        # three keys viewing one storage (overlapping): each is saved with its own values
        "shared_a": shared[0:4],
        "shared_b": shared[2:7],
        "shared_c": shared.view(-1)[3:31:2],
        "tied_1": base,
        "tied_2": base,  # the same tensor object under two keys
    }
    if dtype.is_complex:
        kinds["conj"] = random_tensor(dtype, (4, 3), seed + 7).conj()
        kinds["neg"] = random_tensor(dtype, (4, 3), seed + 8).conj().imag  # neg-bit view
        assert kinds["neg"].is_neg()
    assert kinds["shared_a"].untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    return kinds


def big_kinds(dtype: torch.dtype, seed: int, layout: str) -> dict[str, torch.Tensor]:
    """Tensors > 1 MiB (several chunks), and one whose single row exceeds the inner size."""
    kinds = {
        "big": random_tensor(dtype, _big_shape(dtype), seed + 10),
        "wide": random_tensor(dtype, (3, 40_000), seed + 11),
    }
    if layout in ("sharded", "pieces"):
        rows, cols = _big_shape(dtype)
        kinds["big_T"] = random_tensor(dtype, (cols, rows), seed + 12).t()
    return kinds


def build_state(layout: str) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES):
        name = dtype_name(dtype)
        kinds = big_kinds(dtype, 100 * i, layout)
        if layout == "plain":
            kinds.update(small_kinds(dtype, 100 * i))
        for kind, t in kinds.items():
            sd[f"{name}.{kind}"] = t
    return sd


@pytest.fixture(scope="module", params=list(LAYOUTS))
def saved(request: Any, tmp_path_factory: Any) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(layout, checkpoint path, expected tensors) - saved once per layout."""
    layout = request.param
    sd = build_state(layout)
    path = str(tmp_path_factory.mktemp(f"rt_{layout}") / "ckpt")
    save_fast(sd, path, **LAYOUTS[layout])
    # the layouts really are the ones this test claims to exercise
    arrays = zarrckpt.open(path).metadata["arrays"]
    for fqn, t in sd.items():
        if not fqn.endswith((".big", ".wide", ".big_T")):
            continue
        rec = arrays[fqn]
        n_chunks = math.prod(
            -(-s // c) for s, c in zip(rec["shape"], rec["chunk_shape"], strict=True)
        )
        inner = rec["inner_chunk_shape"]
        if fqn.endswith(".wide") and layout != "pieces":
            pass  # 3 rows of 40,000: one piece, no inner chunks, or one row per inner chunk
        elif layout in ("plain", "sharded"):  # one shard file, several inner chunks
            assert inner is not None and n_chunks == 1, (fqn, rec)
            assert rec["shape"][0] > inner[0], (fqn, rec)
            if fqn.endswith(".big"):
                assert rec["shape"][0] % inner[0] != 0, ("no partial edge chunk", rec)
        elif layout == "pieces":
            assert inner is not None, (fqn, rec)
            assert n_chunks > 1 or fqn.endswith(".wide"), (fqn, rec)
            if fqn.endswith(".big"):
                assert rec["shape"][0] % rec["chunk_shape"][0] != 0, ("no partial edge", rec)
        assert t.numel() * t.element_size() > (1 << 20) or fqn.endswith(".wide")
    if layout == "pieces":
        # an edge shard with inner chunks wholly outside the array (stored as empty)
        assert any(
            (rec["shape"][0] % rec["chunk_shape"][0])
            <= rec["chunk_shape"][0] - 2 * rec["inner_chunk_shape"][0]
            for rec in arrays.values()
            if rec["inner_chunk_shape"] is not None and rec["shape"][0] % rec["chunk_shape"][0]
        )
    return layout, path, sd


def _mismatches(sd: dict[str, torch.Tensor], read: Any) -> list[str]:
    bad = []
    for fqn, expected in sd.items():
        try:
            got = read(fqn)
        except Exception as e:  # report every failing key, not just the first
            bad.append(f"{fqn}: {type(e).__name__}: {e}"[:300])
            continue
        if not bits_equal(expected, got):
            bad.append(f"{fqn}: expected {digest(expected)[:2]}, got {digest(got)[:2]}")
    return bad


# ----------------------------------------------------------------- the readers


def test_load_in_place(saved: Any) -> None:
    _, path, sd = saved
    target = {k: torch.zeros(tuple(v.shape), dtype=v.dtype) for k, v in sd.items()}
    ptrs = {k: (id(v), v.data_ptr()) for k, v in target.items()}
    result = zarrckpt.load(target, path)
    assert result == zarrckpt.LoadResult(missing_keys=[], unexpected_keys=[])
    assert {k: (id(v), v.data_ptr()) for k, v in target.items()} == ptrs
    assert _mismatches(sd, lambda k: target[k]) == []


def test_open_read(saved: Any) -> None:
    _, path, sd = saved
    ckpt = zarrckpt.open(path)
    assert set(ckpt.keys()) == set(sd)
    assert _mismatches(sd, ckpt.read) == []


def test_open_to_dask(saved: Any) -> None:
    _, path, sd = saved
    arrays = zarrckpt.open(path).to_dask()
    assert set(arrays) == set(sd)
    assert _mismatches(sd, lambda k: arrays[k].compute()) == []


def test_open_getitem_zarr(saved: Any) -> None:
    import zarr

    _, path, sd = saved
    ckpt = zarrckpt.open(path)
    assert isinstance(ckpt["float32.big"], zarr.Array)
    assert _mismatches(sd, lambda k: ckpt[k][...]) == []


def test_plain_zarr_subprocess(saved: Any) -> None:
    _, path, sd = saved
    digests = plain_zarr_digests(path, [array_path(k) for k in sd])
    bad = [k for k, t in sd.items() if digests[array_path(k)] != digest(t)]
    assert bad == []


def test_tensorstore(saved: Any) -> None:
    _, path, sd = saved
    assert _mismatches(sd, lambda k: tensorstore_read(path, array_path(k))) == []


def test_state_dict_of_open_checkpoint(saved: Any) -> None:
    _, path, sd = saved
    out = zarrckpt.open(path).state_dict()
    assert set(out) == set(sd)
    assert _mismatches(sd, lambda k: out[k]) == []


def test_partial_reads_across_chunk_boundaries(saved: Any) -> None:
    """Slices that start and end inside chunks / inner chunks (zarr and dask)."""
    layout, path, sd = saved
    ckpt = zarrckpt.open(path)
    arrays = ckpt.to_dask()
    for fqn in ("float32.big", "int8.big", "complex128.wide", "bfloat16.big"):
        rec = ckpt.metadata["arrays"][fqn]
        c0 = rec["chunk_shape"][0]
        rows = sd[fqn].shape[0]
        for start, stop in ((1, min(rows, c0 + 3)), (max(0, c0 - 1), rows), (rows - 1, rows)):
            want = sd[fqn][start:stop, 7:211] if sd[fqn].shape[1] > 211 else sd[fqn][start:stop]
            sl = (
                (slice(start, stop), slice(7, 211))
                if sd[fqn].shape[1] > 211
                else slice(start, stop)
            )
            assert_bits_equal(want, ckpt[fqn][sl], f"zarr {layout} {fqn}[{start}:{stop}]")
            assert_bits_equal(want, arrays[fqn][sl].compute(), f"dask {layout} {fqn}")


# ----------------------------------------------------------------- property test


@st.composite
def _cases(draw: Any) -> tuple[torch.dtype, tuple[int, ...], bool, int, int, int]:
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    if ndim and draw(st.booleans()):
        shape = (draw(st.integers(0, 300)),) + shape[1:]
    transpose = ndim >= 2 and draw(st.booleans())
    chunk_bytes = draw(st.integers(1, 4096))
    inner_bytes = draw(st.integers(1, 2048))
    seed = draw(st.integers(0, 2**16))
    return dtype, shape, transpose, chunk_bytes, inner_bytes, seed


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=_cases())
def test_property_random_shapes_dtypes_chunks(case: Any) -> None:
    dtype, shape, transpose, chunk_bytes, inner_bytes, seed = case
    t = random_tensor(dtype, shape, seed)
    if transpose:
        t = t.transpose(0, 1)
    sd = {"x": t, "meta": {"n": 1}}
    with tempfile.TemporaryDirectory(prefix="zck-prop-") as d:
        path = os.path.join(d, "ckpt")
        save_fast(sd, path, chunk_bytes=chunk_bytes, inner_chunk_bytes=inner_bytes)
        target = {"x": torch.zeros(tuple(t.shape), dtype=dtype), "meta": None}
        zarrckpt.load(target, path)
        assert_bits_equal(t, target["x"], "load")
        assert target["meta"] == {"n": 1}
        ckpt = zarrckpt.open(path)
        assert_bits_equal(t, ckpt.read("x"), "read")
        assert_bits_equal(t, ckpt["x"][...], "zarr")
        assert_bits_equal(t, ckpt.to_dask()["x"].compute(), "dask")
        assert_bits_equal(t, tensorstore_read(path, array_path("x")), "tensorstore")


# ----------------------------------------------------------------- JSON leaves


def _same(a: Any, b: Any, where: str = "") -> None:
    """Equality that tells bool from int, tuple from list, -0.0 from 0.0, and nan == nan."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        ), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert_bits_equal(a, b, where)
    else:
        assert a == b, where


JSON_VALUES: dict[str, Any] = {
    "int": 7,
    "neg_int": -3,
    "big_int": 2**100 + 1,
    "int64_max": 2**63 - 1,
    "float": 0.1,
    "float_exact": 1 / 3,
    "float_tiny": 5e-324,
    "float_huge": 1.7976931348623157e308,
    "neg_zero": -0.0,
    "nan": float("nan"),
    "inf": float("inf"),
    "neg_inf": float("-inf"),
    "str": "héllo \x00 wörld 😀 \u202e",
    "empty_str": "",
    "true": True,
    "false": False,
    "none": None,
    "list": [1, 2.5, "x", None, True, [float("nan"), []], {}],
    "tuple": (1, (2, 3), [4, (5,)], ()),
    "nested": {"a": {"b": {"c": [1, {"d": (float("-inf"), None)}]}}, "e": []},
    "int_keys": {0: "zero", 1: [1], -5: {"x": 1}},
    "mixed": {"t": torch.arange(4, dtype=torch.int16), "v": [torch.ones(2), 3, "s"]},
}


def test_json_leaves_kept_exactly(ckpt_dir: Any) -> None:
    path = ckpt_dir / "json"
    save_fast(JSON_VALUES, path)
    target: dict[str, Any] = {k: None for k in JSON_VALUES}
    zarrckpt.load(target, path)
    for k in JSON_VALUES:
        _same(JSON_VALUES[k], target[k], k)
    out = zarrckpt.open(path).state_dict()
    _same(JSON_VALUES, out, "open().state_dict()")


def test_json_leaves_in_nested_target(ckpt_dir: Any) -> None:
    """Containers of the target are kept; their plain leaves replaced."""
    path = ckpt_dir / "nested"
    sd = {"cfg": {"lr": 0.5, "betas": (0.9, 0.99), "name": "adam"}, "steps": [1, 2, 3]}
    save_fast(sd, path)
    cfg: dict[str, Any] = {"lr": 0.0, "betas": (0.0, 0.0), "name": ""}
    steps = [0, 0, 0]
    target = {"cfg": cfg, "steps": steps}
    zarrckpt.load(target, path)
    assert target["cfg"] is cfg and target["steps"] is steps
    _same(sd, target)


# ----------------------------------------------------------------- in place, cast, meta


def test_load_keeps_objects_and_storage(ckpt_dir: Any) -> None:
    path = ckpt_dir / "ip"
    src = {
        "w": torch.randn(64, 33),
        "nc": torch.randn(20, 30),
        "p": torch.randn(5),
        "l": [torch.randn(3), torch.randn(2, 2)],
    }
    save_fast(src, path, chunk_bytes=1000, inner_chunk_bytes=100)
    w = torch.zeros(64, 33)
    nc = torch.zeros(30, 20).t()  # non-contiguous target
    p = torch.nn.Parameter(torch.zeros(5))
    lst = [torch.zeros(3), torch.zeros(2, 2)]
    target = {"w": w, "nc": nc, "p": p, "l": lst}
    before = {
        "w": w.data_ptr(),
        "nc": nc.data_ptr(),
        "p": p.data_ptr(),
        "l0": lst[0].data_ptr(),
        "l1": lst[1].data_ptr(),
    }
    zarrckpt.load(target, path)
    assert target["w"] is w and target["nc"] is nc and target["p"] is p and target["l"] is lst
    assert lst[0] is target["l"][0]
    after = {
        "w": w.data_ptr(),
        "nc": nc.data_ptr(),
        "p": p.data_ptr(),
        "l0": lst[0].data_ptr(),
        "l1": lst[1].data_ptr(),
    }
    assert after == before
    assert nc.stride() == (1, 20)
    assert isinstance(p, torch.nn.Parameter) and p.requires_grad
    for got, want in (
        (w, src["w"]),
        (nc, src["nc"]),
        (p.detach(), src["p"]),
        (lst[1], src["l"][1]),
    ):
        assert_bits_equal(want, got)


def test_load_into_view_of_shared_storage(ckpt_dir: Any) -> None:
    """Targets that are views of one storage are filled through the views."""
    path = ckpt_dir / "views"
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    save_fast({"a": a, "b": b}, path)
    flat = torch.zeros(24)
    target = {"a": flat[:12].view(4, 3), "b": flat[12:].view(4, 3)}
    zarrckpt.load(target, path)
    assert_bits_equal(torch.cat([a.reshape(-1), b.reshape(-1)]), flat)


@pytest.mark.parametrize(
    "src_dtype,dst_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float8_e4m3fn),
        (torch.float8_e5m2, torch.float64),
        (torch.float32, torch.int32),
        (torch.int64, torch.int8),
        (torch.int32, torch.float64),
        (torch.bool, torch.float32),
        (torch.float32, torch.bool),
        (torch.complex64, torch.complex128),
        (torch.float32, torch.complex64),
    ],
)
def test_load_casts_like_copy_(
    ckpt_dir: Any, src_dtype: torch.dtype, dst_dtype: torch.dtype
) -> None:
    path = ckpt_dir / "cast"
    if src_dtype.is_floating_point:
        src = (torch.randn(7, 5, dtype=torch.float64) * 50).to(src_dtype)
    elif src_dtype.is_complex:
        src = torch.randn(7, 5, dtype=src_dtype)
    elif src_dtype == torch.bool:
        src = torch.rand(7, 5) > 0.5
    else:
        src = torch.randint(-1000, 1000, (7, 5), dtype=src_dtype)
    save_fast({"x": src}, path)
    target = torch.full((7, 5), 3, dtype=dst_dtype)
    ptr = target.data_ptr()
    zarrckpt.load({"x": target}, path)
    assert target.data_ptr() == ptr and target.dtype == dst_dtype
    assert_bits_equal(torch.empty(7, 5, dtype=dst_dtype).copy_(src), target)


def test_meta_device_targets_are_replaced(ckpt_dir: Any) -> None:
    path = ckpt_dir / "meta"
    src = {"w": torch.randn(6, 4), "b": torch.randn(4).to(torch.bfloat16), "keep": torch.ones(2)}
    save_fast(src, path)
    keep = torch.zeros(2)
    target = {
        "w": torch.empty(6, 4, device="meta"),
        "b": torch.empty(4, dtype=torch.bfloat16, device="meta"),
        "keep": keep,
    }
    zarrckpt.load(target, path)
    assert target["w"].device.type == "cpu" and target["b"].device.type == "cpu"
    assert_bits_equal(src["w"], target["w"])
    assert_bits_equal(src["b"], target["b"])
    assert target["keep"] is keep
    assert_bits_equal(src["keep"], keep)


def test_meta_target_cast(ckpt_dir: Any) -> None:
    path = ckpt_dir / "metacast"
    src = torch.randn(3, 3)
    save_fast({"w": src}, path)
    target = {"w": torch.empty(3, 3, dtype=torch.bfloat16, device="meta")}
    zarrckpt.load(target, path)
    assert target["w"].dtype == torch.bfloat16 and target["w"].device.type == "cpu"
    assert_bits_equal(src.to(torch.bfloat16), target["w"])


def test_meta_module_load(ckpt_dir: Any) -> None:
    """A model built on the meta device, its state dict loaded, then assigned."""
    path = ckpt_dir / "metamod"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    save_fast({"model": model.state_dict()}, path)
    with torch.device("meta"):
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    target = {"model": fresh.state_dict()}
    zarrckpt.load(target, path)
    fresh.load_state_dict(target["model"], assign=True)
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert k == k2 and v2.device.type == "cpu"
        assert_bits_equal(v, v2, k)


# ----------------------------------------------------------------- stateful objects


class Counter:
    """A small stateful object: a step counter and a tensor, restored in place."""

    def __init__(self, step: int = 0, n: int = 4) -> None:
        self.step = step
        self.buf = torch.zeros(n)
        self.loaded = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "buf": self.buf, "history": [self.step, "ok"]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = sd["step"]
        self.buf.copy_(sd["buf"])
        self.loaded += 1


def test_stateful_small_class(ckpt_dir: Any) -> None:
    path = ckpt_dir / "stateful"
    c = Counter(step=41)
    c.buf = torch.randn(4)
    save_fast({"counter": c, "other": torch.ones(1)}, path)
    # stored through state_dict(): plain zarr arrays + JSON, no pickle
    ckpt = zarrckpt.open(path)
    assert set(ckpt.keys()) == {"counter.buf", "other"}
    assert ckpt.state_dict()["counter"]["step"] == 41
    fresh = Counter()
    buf = fresh.buf
    target = {"counter": fresh, "other": torch.zeros(1)}
    zarrckpt.load(target, path)
    assert target["counter"] is fresh and fresh.loaded == 1
    assert fresh.step == 41
    assert fresh.buf is buf
    assert_bits_equal(c.buf, fresh.buf)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()


def _make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3, bias=False)
    )


def test_stateful_module_and_optimizer(ckpt_dir: Any) -> None:
    path = ckpt_dir / "modopt"
    torch.manual_seed(1)
    model = _make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    for i in range(3):
        _train_step(model, opt, i)
    save_fast({"model": model, "optim": opt, "epoch": 3}, path)

    torch.manual_seed(2)
    model2 = _make_model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    _train_step(model2, opt2, 99)  # a step so its state exists (as in DCP)
    params = [p for p in model2.parameters()]
    ptrs = [p.data_ptr() for p in params]
    target = {"model": model2, "optim": opt2, "epoch": 0}
    zarrckpt.load(target, path)
    assert target["epoch"] == 3
    assert [p.data_ptr() for p in model2.parameters()] == ptrs
    assert all(a is b for a, b in zip(params, model2.parameters(), strict=True))
    for (k, v), (_, v2) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert_bits_equal(v, v2, k)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"] == s1["param_groups"]
    for pid, st1 in s1["state"].items():
        for name, val in st1.items():
            assert_bits_equal(val, s2["state"][pid][name], f"optim.state.{pid}.{name}")
    # both continue identically
    _train_step(model, opt, 7)
    _train_step(model2, opt2, 7)
    for (k, v), (_, v2) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert_bits_equal(v, v2, k)


def test_optimizer_through_get_state_dict(ckpt_dir: Any) -> None:
    """The documented way: torch.distributed.checkpoint.state_dict, fresh optimizer."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = ckpt_dir / "dcpsd"
    torch.manual_seed(3)
    model = _make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for i in range(2):
        _train_step(model, opt, i)
    msd, osd = get_state_dict(model, opt)
    save_fast({"model": msd, "optim": osd}, path)

    model2 = _make_model()
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)  # no step: state not initialised
    msd2, osd2 = get_state_dict(model2, opt2)
    target = {"model": msd2, "optim": osd2}
    zarrckpt.load(target, path)
    set_state_dict(model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    _train_step(model, opt, 5)
    _train_step(model2, opt2, 5)
    for (k, v), (_, v2) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert_bits_equal(v, v2, k)


# ----------------------------------------------------------------- > 2 GiB


@pytest.mark.slow
def test_tensor_larger_than_2gib(tmp_path: Any) -> None:
    """One ~2.1 GiB uint8 tensor, saved with the default layout (64 MiB sharded
    chunks) and as one single 2.1 GiB chunk file.

    Each is loaded back in place into the same (zeroed) tensor, so only one
    2.1 GiB buffer ever exists; then the tail is read through zarr (offsets
    beyond 2**31).
    """
    n = (2 << 30) + (100 << 20) + 12_345  # ~2.1 GiB, not a multiple of anything
    words = n // 4
    step = 1 << 26

    def fill_pattern(t: torch.Tensor) -> None:
        # every 4-byte word holds its own index: a misplaced chunk cannot go unnoticed
        torch.arange(words, dtype=torch.int32, out=t[: words * 4].view(torch.int32))
        t[words * 4 :] = 0xA5

    def check_pattern(t: torch.Tensor) -> None:
        w = t[: words * 4].view(torch.int32)
        ref = torch.empty(step, dtype=torch.int32)  # reused: no 2 GiB of temporaries
        for start in range(0, words, step):
            stop = min(words, start + step)
            torch.arange(start, stop, dtype=torch.int32, out=ref[: stop - start])
            assert torch.equal(w[start:stop], ref[: stop - start]), start
        assert bool((t[words * 4 :] == 0xA5).all())

    big = torch.empty(n, dtype=torch.uint8)
    fill_pattern(big)
    default, single = tmp_path / "huge", tmp_path / "huge1"
    try:
        zarrckpt.save({"big": big, "step": 1}, default, fsync=False)
        # one 2.1 GiB plain chunk file: single writev / preadv calls beyond 2**31 bytes
        zarrckpt.save(
            {"big": big}, single, fsync=False, chunk_bytes=3 << 30, inner_chunk_bytes=3 << 30
        )
        ptr = big.data_ptr()
        for path in (default, single):
            big.zero_()
            target = {"big": big}
            zarrckpt.load(target, path)
            assert target["big"] is big and big.data_ptr() == ptr
            check_pattern(big)
        rec = zarrckpt.open(single).metadata["arrays"]["big"]
        assert rec["chunk_shape"] == [n] and rec["inner_chunk_shape"] is None
        ckpt = zarrckpt.open(default)
        assert ckpt.metadata["arrays"]["big"]["shape"] == [n]
        tail = slice(n - 3_000_000, n)
        np.testing.assert_array_equal(ckpt["big"][tail], big[tail].numpy())
    finally:
        del big
        gc.collect()
        shutil.rmtree(default, ignore_errors=True)
        shutil.rmtree(single, ignore_errors=True)
