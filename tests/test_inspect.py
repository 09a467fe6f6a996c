"""Offline inspection: Checkpoint.info/tree/to_dask/stats/diff/verify on real saves.

The model checkpoints come from the producers of tests/_inspect_fixtures.py
(single-process and 2-rank FSDP2 saves); every parametrized test runs on each.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _inspect_fixtures import PRODUCERS, SMALL_CHUNKS, Produced, get_produced

import zarrckpt
from zarrckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from zarrckpt.format._marker import COMMIT_MARKER, FORMAT_VERSION
from zarrckpt.inspect import PickledInfo, TensorInfo, _scan, verify

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=sorted(PRODUCERS))
def produced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Produced:
    return get_produced(request.param, tmp_path_factory)


# ------------------------------------------------------------------ reference


def _numpy_values(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float16):
        return t.float().numpy()
    return t.numpy()


def numpy_stats(t: torch.Tensor) -> dict[str, Any]:
    """What stats must report, computed by numpy on the whole tensor."""
    a = _numpy_values(t)
    out: dict[str, Any] = {
        "count": a.size,
        "nan": int(np.isnan(a).sum()) if a.dtype.kind in "fc" else 0,
        "inf": int(np.isinf(a).sum()) if a.dtype.kind in "fc" else 0,
        "zeros": int((a == 0).sum()),
    }
    v = np.abs(a) if a.dtype.kind == "c" else a
    if v.dtype == np.bool_:
        v = v.astype(np.uint8)
    if a.size == 0:
        return out | {"min": None, "max": None, "mean": None, "std": None, "norm": 0.0}
    with np.errstate(invalid="ignore", over="ignore"):
        v64 = v.astype(np.float64)
        return out | {
            "min": v.min().item(),
            "max": v.max().item(),
            "mean": float(v64.mean()),
            "std": float(v64.std()),
            "norm": float(np.linalg.norm(v64.reshape(-1))),
        }


def _close(got: Any, want: Any, rel: float = 1e-9) -> bool:
    if want is None or got is None:
        return got is want
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    if isinstance(want, float) and math.isinf(want):
        return got == want
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-12)


def assert_stats_match(stats: Any, t: torch.Tensor, fqn: str) -> None:
    ref = numpy_stats(t)
    assert stats.count == ref["count"], fqn
    assert (stats.nan, stats.inf, stats.zeros) == (ref["nan"], ref["inf"], ref["zeros"]), fqn
    assert stats.shape == tuple(t.shape) and stats.dtype == str(t.dtype).removeprefix("torch.")
    for name in ("min", "max"):  # exact: computed in the stored precision or exact upcast
        got, want = getattr(stats, name), ref[name]
        assert _close(got, want, rel=0.0), (fqn, name, got, want)
    for name in ("mean", "std", "norm"):
        got, want = getattr(stats, name), ref[name]
        assert _close(got, want), (fqn, name, got, want)


# ------------------------------------------------------------------ metadata


def test_info(produced: Produced) -> None:
    ckpt = zarrckpt.open(produced.before)
    info = ckpt.info()
    ref = produced.before_tensors
    assert info.format_version == FORMAT_VERSION
    assert info.world_size == (2 if produced.label.startswith("fsdp2_ws2") else 1)
    assert info.tensors == len(ref) == len(ckpt.keys())
    assert info.total_bytes == sum(t.numel() * t.element_size() for t in ref.values())
    assert info.dtypes == {
        "float32": {"tensors": len(ref), "bytes": info.total_bytes}
    }
    created = datetime.datetime.fromisoformat(info.created)
    age = datetime.datetime.now(datetime.UTC) - created
    assert datetime.timedelta(0) <= age < datetime.timedelta(hours=6)
    assert info.checkpoint_id == ckpt.metadata["checkpoint_id"]
    assert info.to_dict()["tensors"] == info.tensors


def test_tree(produced: Produced) -> None:
    ckpt = zarrckpt.open(produced.before)
    tree = ckpt.tree()
    assert set(tree) == {"model", "optim", "step"}
    assert tree["step"] == 1
    w = tree["model"]["emb.weight"]
    assert isinstance(w, TensorInfo)
    ref = produced.before_tensors["model.emb.weight"]
    assert (w.fqn, w.shape, w.dtype, w.nbytes) == ("model.emb.weight", tuple(ref.shape),
                                                    "float32", ref.numel() * 4)
    stored = ckpt["model.emb.weight"]  # zarr.Array: shards (sharded) or chunks (plain)
    assert w.chunks == tuple(stored.shards or stored.chunks)
    assert tree["optim"]["param_groups"][0]["lr"] == 0.01
    assert tree["optim"]["state"]["emb.weight"]["exp_avg"].fqn == "optim.state.emb.weight.exp_avg"

    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, TensorInfo):
            found.append(node.fqn)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(tree)
    assert sorted(found) == sorted(ckpt.keys())


def test_tree_pickled_and_plain(tmp_path: Path) -> None:
    path = tmp_path / "c"
    zarrckpt.save(
        {"a": [1, (2.5, float("nan"))], "obj": {1, 2}, 3: torch.ones(2)},
        path, allow_pickle=True, fsync=False,
    )
    tree = zarrckpt.open(path).tree()
    assert tree["a"][0] == 1 and tree["a"][1][0] == 2.5 and math.isnan(tree["a"][1][1])
    assert isinstance(tree["a"][1], tuple)
    assert isinstance(tree["obj"], PickledInfo) and tree["obj"].nbytes > 0
    assert isinstance(tree[3], TensorInfo) and tree[3].shape == (2,)


# ------------------------------------------------------------------ dask


def test_to_dask_uses_stored_chunks(produced: Produced) -> None:
    ckpt = zarrckpt.open(produced.after)
    arrays = ckpt.to_dask()
    assert list(arrays) == ckpt.keys()
    for fqn, arr in arrays.items():
        stored = ckpt[fqn]  # zarr.Array
        grid = stored.shards or stored.chunks  # the stored chunk files
        ref = produced.after_tensors[fqn]
        if arr.ndim:
            assert arr.chunksize == tuple(min(c, s) for c, s in zip(grid, arr.shape,
                                                                      strict=True)), fqn
        np.testing.assert_array_equal(arr.compute(), ref.numpy(), err_msg=fqn)
    assert set(ckpt.to_dask("model.*")) == {k for k in ckpt if k.startswith("model.")}


def test_chunk_source_pickles_small(produced: Produced) -> None:
    """dask.distributed ships the array-like to worker processes: it must pickle
    without the manifest and still read (checksums verified)."""
    ckpt = zarrckpt.open(produced.after)
    arr = ckpt.to_dask("model.emb.weight")["model.emb.weight"]
    (source,) = [v for v in arr.dask.values() if type(v).__name__ == "_ChunkSource"]
    data = pickle.dumps(source)
    assert b"param_groups" not in data and len(data) < 4000
    clone = pickle.loads(data)
    np.testing.assert_array_equal(clone[2:7, 1:5], produced.after_tensors[
        "model.emb.weight"].numpy()[2:7, 1:5])


# ------------------------------------------------------------------ stats


def test_stats_equal_numpy(produced: Produced) -> None:
    ckpt = zarrckpt.open(produced.after)
    stats = ckpt.stats()
    assert list(stats) == ckpt.keys()
    for fqn, t in produced.after_tensors.items():
        assert_stats_match(stats[fqn], t, fqn)
    some = ckpt.stats("optim.state.*.exp_avg")
    assert set(some) == {k for k in ckpt if re.fullmatch(r"optim\.state\..*\.exp_avg", k)}
    assert some["optim.state.emb.weight.exp_avg"] == stats["optim.state.emb.weight.exp_avg"]


def _zoo() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    f = torch.randn(300, 70, generator=g)
    special = f.clone()
    special[0, 0] = float("nan")
    special[1, 1] = float("inf")
    special[2, 2] = float("-inf")
    special[3, :5] = 0.0
    inf_only = f.clone()
    inf_only[250, 5] = float("inf")
    return {
        "f32": f,
        "f64": f.double() * 1e3,
        "f16": f.half(),
        "bf16": f.bfloat16(),
        "e4m3": (f * 4).to(torch.float8_e4m3fn),
        "e5m2": (f * 4).to(torch.float8_e5m2),
        "i8": torch.randint(-128, 128, (1000,), generator=g, dtype=torch.int8),
        "i64": torch.randint(-(2**40), 2**40, (50, 7), generator=g, dtype=torch.int64),
        "u8": torch.randint(0, 256, (33, 9), generator=g, dtype=torch.uint8),
        "bool": torch.rand(999, generator=g) > 0.3,
        "c64": torch.randn(40, 3, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "scalar_int": torch.tensor(-7),
        "scalar_nan": torch.tensor(float("nan")),
        "empty": torch.empty(0, 5),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "special": special,
        "inf_only": inf_only,
        "zeros": torch.zeros(17, 3),
        "offset": torch.randn(2000, 33, generator=g, dtype=torch.float64) * 1e-3 + 1e4,
    }


@pytest.fixture(scope="module")
def zoo_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    path = str(tmp_path_factory.mktemp("zoo") / "zoo")
    tensors = _zoo()
    # the object-store layout (one chunk file per piece): several files to damage
    zarrckpt.save(tensors, path, fsync=False, file_layout="pieces", **SMALL_CHUNKS)
    return path, tensors


def test_stats_every_dtype_and_shape(zoo_ckpt: tuple[str, dict[str, torch.Tensor]]) -> None:
    path, tensors = zoo_ckpt
    ckpt = zarrckpt.open(path)
    # several chunks, sharded chunks and partial edge chunks are all exercised
    assert ckpt._files.arrays["f64"].layout.inner_shape is not None
    assert len(ckpt.to_dask("f32")["f32"].chunks[0]) > 2
    stats = ckpt.stats()
    for fqn, t in tensors.items():
        assert_stats_match(stats[fqn], t, fqn)
    assert isinstance(stats["i64"].min, int) and isinstance(stats["f32"].min, float)
    assert stats["special"].nan == 1 and stats["special"].inf == 2
    assert math.isnan(stats["special"].mean) and math.isnan(stats["special"].norm)
    assert stats["inf_only"].max == math.inf and math.isinf(stats["inf_only"].norm)
    assert stats["empty"].to_dict() == {
        "fqn": "empty", "dtype": "float32", "shape": [0, 5], "count": 0, "min": None,
        "max": None, "mean": None, "std": None, "norm": 0.0, "nan": 0, "inf": 0, "zeros": 0,
    }
    assert stats["bool"].mean == pytest.approx(tensors["bool"].float().mean().item())


def test_stats_independent_of_task_packing(
    zoo_ckpt: tuple[str, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One task per slab (partials merged on the client) gives the same statistics."""
    path, tensors = zoo_ckpt
    ckpt = zarrckpt.open(path)
    together = ckpt.stats()
    monkeypatch.setattr(_scan, "TASK_BYTES", 1)
    calls: list[tuple[int, int]] = []
    apart = ckpt.stats(progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > 20  # one progress call per task
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    for fqn, t in tensors.items():
        assert_stats_match(apart[fqn], t, fqn)
        for name in ("count", "min", "max", "nan", "inf", "zeros"):
            assert _close(getattr(apart[fqn], name), getattr(together[fqn], name), 0.0)


def test_stats_on_distributed_local_cluster(
    produced: Produced, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    ckpt = zarrckpt.open(produced.after)
    monkeypatch.setattr(_scan, "TASK_BYTES", 16 << 10)  # several tasks for two workers
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        stats = ckpt.stats()
        report = ckpt.verify()
        total = ckpt.to_dask("model.emb.weight")["model.emb.weight"].sum().compute()
    for fqn, t in produced.after_tensors.items():
        assert_stats_match(stats[fqn], t, fqn)
    assert report.ok, report
    assert total == pytest.approx(produced.after_tensors["model.emb.weight"].sum().item(),
                                  rel=1e-5)
    keys = [str(t["key"]) for t in stream.data]
    n_stats = sum(k.startswith("zarrckpt-stats") for k in keys)
    assert n_stats >= 2, keys
    workers = {t["worker"] for t in stream.data if str(t["key"]).startswith("zarrckpt-stats")}
    assert len(workers) == 2


def test_stats_reports_damage(tmp_path: Path, zoo_ckpt: tuple[str, dict[str, torch.Tensor]]
                              ) -> None:
    path = tmp_path / "c"
    shutil.copytree(zoo_ckpt[0], path)
    _flip(path, "f32", (0, 0), 3)
    with pytest.raises(CorruptCheckpointError, match="'f32'.*checksum"):
        zarrckpt.open(path).stats()
    assert set(zarrckpt.open(path).stats("i[0-9]*")) == {"i8", "i64"}  # undamaged: fine


def test_histograms_match_numpy(zoo_ckpt: tuple[str, dict[str, torch.Tensor]]) -> None:
    path, tensors = zoo_ckpt
    hists = zarrckpt.open(path).histograms(bins=7)
    for fqn in ("f32", "bf16", "i8", "special"):
        values = _numpy_values(tensors[fqn]).astype(np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        counts, edges = np.histogram(values, bins=7)
        np.testing.assert_array_equal(hists[fqn][0], counts, err_msg=fqn)
        np.testing.assert_allclose(hists[fqn][1], edges, err_msg=fqn)
    assert "empty" not in hists


# ------------------------------------------------------------------ diff


def test_diff_finds_exactly_one_optimizer_step(produced: Produced) -> None:
    before = zarrckpt.open(produced.before)
    report = before.diff(produced.after)
    expected = produced.changed
    assert "model.frozen" not in expected and "model.scale" not in expected
    assert {"model.emb.weight", "optim.state.emb.weight.exp_avg"} <= expected
    assert set(report.changed) == expected
    assert not report.added and not report.removed
    assert not report.shape_changed and not report.dtype_changed and not report.kind_changed
    assert report.values_changed == {"step": (1, 2)}
    assert not report.identical and bool(report)
    assert set(report.tensors) == set(produced.before_tensors)
    for fqn, d in report.tensors.items():
        a, b = produced.before_tensors[fqn].double(), produced.after_tensors[fqn].double()
        assert d.count == a.numel()
        assert d.different == int((a != b).sum())
        assert d.max_abs == pytest.approx((a - b).abs().max().item(), rel=1e-12, abs=0)
    # tolerances: a loose atol hides the step, a tight one does not
    assert zarrckpt.open(produced.before).diff(produced.after, atol=1e3).changed == []
    assert set(before.diff(produced.after, rtol=1e-12).changed) == expected


def test_diff_identical(produced: Produced) -> None:
    ckpt = zarrckpt.open(produced.after)
    report = ckpt.diff(ckpt)
    assert report.identical and not report and report.changed == []
    assert all(d.max_abs == 0 and d.different == 0 for d in report.tensors.values())


def test_diff_across_world_sizes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A single-process and a 2-rank FSDP2 save of the same training: different
    chunkings, same values."""
    if "fsdp2_ws2" not in PRODUCERS:
        pytest.fail("the fsdp2_ws2 producer is required")
    single = get_produced("single", tmp_path_factory)
    fsdp = get_produced("fsdp2_ws2", tmp_path_factory)
    a, b = zarrckpt.open(single.after), zarrckpt.open(fsdp.after)
    units = [
        c._files.arrays["model.emb.weight"].layout.inner_shape
        or c._files.arrays["model.emb.weight"].layout.chunk_shape
        for c in (a, b)
    ]
    assert units[0] != units[1]
    report = a.diff(b, rtol=1e-6, atol=1e-7)
    assert report.identical, report.to_dict()
    assert set(report.tensors) == set(single.after_tensors)


def test_diff_keys_shapes_dtypes_kinds(tmp_path: Path) -> None:
    a = {"same": torch.arange(6.0), "gone": torch.ones(2), "grow": torch.zeros(3),
         "cast": torch.arange(4.0), "kind": torch.ones(1), "lr": 0.1, "nan": float("nan"),
         "blob": {1, 2}}
    b = {"same": torch.arange(6.0), "new": torch.ones(2), "grow": torch.zeros(4),
         "cast": torch.arange(4.0).double(), "kind": 3, "lr": 0.2, "nan": float("nan"),
         "blob": {1, 2, 3}}
    zarrckpt.save(a, tmp_path / "a", fsync=False, allow_pickle=True)
    zarrckpt.save(b, tmp_path / "b", fsync=False, allow_pickle=True)
    report = zarrckpt.open(tmp_path / "a").diff(tmp_path / "b")
    assert report.removed == ["gone"] and report.added == ["new"]
    assert report.shape_changed == {"grow": ((3,), (4,))}
    assert report.dtype_changed == {"cast": ("float32", "float64")}
    assert report.kind_changed == {"kind": ("tensor", "value")}
    assert set(report.values_changed) == {"lr", "blob"}  # nan == nan for plain values
    assert report.changed == ["cast"]  # equal values, changed dtype
    assert report.tensors["cast"].different == 0
    assert not report.tensors["same"].changed
    d = report.to_dict()
    assert d["identical"] is False and d["shape_changed"] == {"grow": [[3], [4]]}


def test_diff_values_tolerances_and_nan(tmp_path: Path) -> None:
    x = torch.tensor([1.0, 2.0, float("nan"), 0.0, 100.0])
    y = torch.tensor([1.0, 2.001, float("nan"), 0.0, 100.05])
    zarrckpt.save({"x": x}, tmp_path / "a", fsync=False)
    zarrckpt.save({"x": y}, tmp_path / "b", fsync=False)
    a = zarrckpt.open(tmp_path / "a")
    d = a.diff(tmp_path / "b").tensors["x"]
    assert d.different == 2
    assert d.max_abs == pytest.approx(0.05, rel=1e-3)
    assert d.max_rel == pytest.approx(0.001 / 2.001, rel=1e-3)
    assert a.diff(tmp_path / "b", atol=0.01).tensors["x"].different == 1
    assert a.diff(tmp_path / "b", rtol=1e-3).tensors["x"].different == 0


# ------------------------------------------------------------------ verify


def _chunk_file(path: Path | str, fqn: str, index: tuple[int, ...]) -> Path:
    """File of chunk ``index`` of ``fqn`` (needs the commit marker: call before removing it)."""
    entry = zarrckpt.open(path)._files.arrays[fqn]
    return Path(path) / entry.path / entry.layout.chunk_key(index)


def _flip(path: Path | str, fqn: str, index: tuple[int, ...], offset: int) -> None:
    file = _chunk_file(path, fqn, index)
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x40
    file.write_bytes(bytes(data))


def test_verify_intact(produced: Produced) -> None:
    ckpt = zarrckpt.open(produced.before)
    report = ckpt.verify()
    assert report.ok and report.committed and report.problems == []
    assert report.arrays == len(ckpt.keys())
    assert report.bytes_verified == sum(t.numel() * 4 for t in produced.before_tensors.values())
    assert report.chunks >= len(ckpt.keys())
    assert "OK" in str(report)


def test_verify_reports_every_problem(produced: Produced, tmp_path: Path) -> None:
    """Flipped byte, missing chunk, truncated chunk, missing commit marker: all at once."""
    path = tmp_path / "damaged"
    shutil.copytree(produced.before, path)
    _flip(path, "model.emb.weight", (0, 0), 100)
    missing = _chunk_file(path, "model.out.weight", (0, 0))
    truncated = _chunk_file(path, "optim.state.emb.weight.exp_avg", (0, 0))
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:-7])
    (path / COMMIT_MARKER).unlink()

    with pytest.raises(IncompleteCheckpointError):
        zarrckpt.open(path)
    report = verify(path)
    got = sorted((p.kind, p.key) for p in report.problems)
    assert got == sorted([
        ("checksum", "model.emb.weight"),
        ("missing_chunk", "model.out.weight"),
        ("truncated_chunk", "optim.state.emb.weight.exp_avg"),
        ("missing_commit_marker", None),
    ]), report
    assert not report.ok and not report.committed
    assert report.arrays == len(produced.before_tensors)
    by_kind = {p.kind: p for p in report.problems}
    assert by_kind["missing_chunk"].file == os.path.relpath(missing, path)
    assert str(path) in by_kind["checksum"].message
    assert report.to_dict()["problems"][0]["kind"] in {k for k, _ in got}


@pytest.mark.parametrize("damage", ["flip", "missing", "truncate", "marker"])
def test_verify_each_damage_alone(damage: str, tmp_path: Path,
                                  zoo_ckpt: tuple[str, dict[str, torch.Tensor]]) -> None:
    path = tmp_path / "c"
    shutil.copytree(zoo_ckpt[0], path)
    file = _chunk_file(path, "bf16", (1, 0))
    if damage == "flip":
        _flip(path, "bf16", (1, 0), 5)
    elif damage == "missing":
        file.unlink()
    elif damage == "truncate":
        file.write_bytes(file.read_bytes()[:10])
    else:
        (path / COMMIT_MARKER).unlink()
    kinds = {"flip": "checksum", "missing": "missing_chunk", "truncate": "truncated_chunk",
             "marker": "missing_commit_marker"}
    report = verify(path)
    assert [p.kind for p in report.problems] == [kinds[damage]], report
    if damage != "marker":
        assert report.problems[0].key == "bf16"
        assert report.problems[0].file == "bf16/c.1.0"
        assert zarrckpt.open(path).verify().problems == report.problems


def test_verify_finds_every_damaged_inner_chunk(tmp_path: Path,
                                                zoo_ckpt: tuple[str, dict[str, torch.Tensor]]
                                                ) -> None:
    path = tmp_path / "c"
    shutil.copytree(zoo_ckpt[0], path)
    layout = zarrckpt.open(path)._files.arrays["f64"].layout
    assert layout.inner_shape is not None
    inner = layout.inner_nbytes + 4
    start = layout.index_nbytes  # format 3: the index comes first
    _flip(path, "f64", (0, 0), start + 1)  # first inner chunk
    _flip(path, "f64", (0, 0), start + 2 * inner + 9)  # third inner chunk, same slab
    _flip(path, "i64", (0, 0), 0)
    report = verify(path)
    assert sorted((p.kind, p.key) for p in report.problems) == [
        ("checksum", "f64"), ("checksum", "f64"), ("checksum", "i64")
    ], report


def test_verify_metadata_problems(tmp_path: Path,
                                  zoo_ckpt: tuple[str, dict[str, torch.Tensor]]) -> None:
    path = tmp_path / "c"
    shutil.copytree(zoo_ckpt[0], path)
    file = _chunk_file(path, "u8", (0, 0))
    file.write_bytes(file.read_bytes() + b"xx")
    (path / "i8" / "zarr.json").unlink()
    root = path / "zarr.json"
    root.write_bytes(root.read_bytes().replace(b'"zarr_format": 3', b'"zarr_format":  3'))
    report = verify(path)
    assert sorted((p.kind, p.key) for p in report.problems) == [
        ("array_metadata", "i8"), ("oversized_chunk", "u8"), ("root_metadata", None)
    ], report
    (path / "zarr.json").unlink()
    assert [p.kind for p in verify(path).problems] == ["root_metadata"]
    with pytest.raises(zarrckpt.errors.CheckpointNotFoundError):
        verify(tmp_path / "nothing")


# ------------------------------------------------------------------ docs


def _python_blocks(markdown: str) -> list[str]:
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", markdown, re.S)]


_RUN_BLOCKS = r"""
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
for i, block in enumerate(blocks):
    try:
        exec(compile(block, f"docs/inspect.md block {i}", "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"BLOCK {i} FAILED", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def test_docs_inspect_examples_run(tmp_path: Path) -> None:
    """Every python block of docs/inspect.md runs as is, each in a fresh namespace
    (one interpreter, so torch is imported once)."""
    import json

    blocks = _python_blocks((ROOT / "docs" / "inspect.md").read_text())
    assert len(blocks) >= 6
    proc = subprocess.run([sys.executable, "-c", _RUN_BLOCKS], input=json.dumps(blocks),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (ROOT / "docs" / "img" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
