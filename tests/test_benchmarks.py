"""The benchmark suite (benchmarks/) runs end to end and reports honest numbers.

The command runs in its tiny mode (``--quick --tiny``: a few MB, seconds);
nothing here asserts on speed, only on the completeness and the arithmetic of
the report, and on the load verification catching a system that does not load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks._worker import LOAD_OPS, SAVE_OPS  # noqa: E402
from benchmarks._worker import run as run_worker  # noqa: E402
from benchmarks.async_save import ASYNC_OPS  # noqa: E402
from benchmarks.distributed import RESHARD_OPS  # noqa: E402
from benchmarks.systems import RAW, SYSTEMS, System, register_system  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.json") as f:
        return out, json.load(f)


def _row(results: dict[str, Any], workload: str, system: str, op: str) -> dict[str, Any]:
    rows = [
        r
        for r in results["results"]
        if (r["workload"], r["system"], r["op"]) == (workload, system, op)
    ]
    assert len(rows) == 1, (workload, system, op, len(rows))
    return rows[0]


def _expected_ops(kind: str, workload: str, system: System) -> tuple[str, ...]:
    """The operations the runner of ``kind`` measures for ``system``."""
    if kind == "single":
        return (SAVE_OPS if system.save else ()) + (LOAD_OPS if system.load else ())
    if kind == "async":
        return ASYNC_OPS if system.name in ("zarrckpt", "dcp") else ASYNC_OPS[:1]
    if workload == "reshard":
        return RESHARD_OPS if system.name != RAW else ()
    return SAVE_OPS + LOAD_OPS


def test_every_system_and_workload_is_measured(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = tiny_run
    assert set(results["workloads"]) == set(WORKLOADS)
    assert set(results["systems"]) == set(SYSTEMS)
    repeats = results["meta"]["repeats"]
    warmup = results["meta"]["warmup"]
    measured = {(r["workload"], r["system"], r["op"]) for r in results["results"]}
    expected = set()
    for workload, spec in WORKLOADS.items():
        for name, system in SYSTEMS.items():
            if spec.kind not in system.kinds:
                continue
            ops = _expected_ops(spec.kind, workload, system)
            for op in ops:
                expected.add((workload, name, op))
                row = _row(results, workload, name, op)
                assert row["error"] is None, row["error"]
                assert row["n"] == repeats == len(row["times_s"])
                assert all(t > 0 for t in row["times_s"])
                assert row["peak_rss_mb"] is not None and row["peak_rss_mb"] > 0
                if op in LOAD_OPS + RESHARD_OPS:  # every round (warm-up included) verified
                    assert row["verified_loads"] == len(row["warmup_s"]) + repeats
                if spec.kind == "async" and name in ("zarrckpt", "dcp"):
                    assert row["verified_loads"] == 1  # the saved checkpoint loads bit-exact
                if spec.kind == "single":
                    # warm-up rounds precede the first save and the first load operation
                    first = op in (SAVE_OPS[0], LOAD_OPS[0])
                    assert len(row["warmup_s"]) == (warmup if first else 0)
    assert measured == expected


def test_resharding_reads_only_what_it_needs(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    """zarrckpt reads ~ the bytes each rank needs; DCP reads whole stored pieces 2 -> 4."""
    _, results = tiny_run
    for op, world in (("load_4to2", 2), ("load_2to4", 4)):
        mine = _row(results, "reshard", "zarrckpt", op)["metrics"]
        theirs = _row(results, "reshard", "dcp", op)["metrics"]
        assert len(theirs["bytes_read"]) == world
        assert len(mine["bytes_read"]) == len(mine["bytes_needed"]) == world
        assert sum(mine["bytes_needed"]) == results["workloads"]["reshard"]["nbytes"]
        assert mine["read_amplification"] == max(
            r / n for r, n in zip(mine["bytes_read"], mine["bytes_needed"], strict=True)
        )
        assert 1.0 <= mine["read_amplification"] <= 1.1
    assert _row(results, "reshard", "dcp", "load_2to4")["metrics"]["read_amplification"] >= 1.5


def test_ratios_are_computed_from_the_measured_times(
    tiny_run: tuple[Path, dict[str, Any]],
) -> None:
    _, results = tiny_run
    for workload, info in results["workloads"].items():
        if WORKLOADS[workload].kind == "async" or workload == "reshard":
            continue  # no raw bound for these
        for op in SAVE_OPS + LOAD_OPS:
            raw = _row(results, workload, RAW, op)
            mine = _row(results, workload, "zarrckpt", op)
            for row in (raw, mine):
                assert row["median_s"] == pytest.approx(statistics.median(row["times_s"]))
                assert row["min_s"] == min(row["times_s"])
                assert row["max_s"] == max(row["times_s"])
                assert row["gbps"] == pytest.approx(info["nbytes"] / row["median_s"] / 1e9)
            expected = statistics.median(raw["times_s"]) / statistics.median(mine["times_s"])
            assert mine["ratio_to_raw"] == pytest.approx(expected)
            assert raw["ratio_to_raw"] == pytest.approx(1.0)
    evaluated = 0
    for target in results["targets"]:
        if target["met"] is None:
            continue
        evaluated += 1
        mine = _row(results, target["workload"], target["system"], target["op"])
        if "metric" in target:
            value = mine["metrics"][target["metric"]]
            assert target["value"] == value
            assert target["met"] == (value <= target["max_value"])
            continue
        ref = _row(results, target["workload"], target["reference"], target["op"])
        speedup = statistics.median(ref["times_s"]) / statistics.median(mine["times_s"])
        assert target["speedup"] == pytest.approx(speedup)
        assert target["met"] == (speedup >= target["min_speedup"])
    keys = {t["key"] for t in results["targets"] if t["met"] is not None}
    assert keys == {t.key for t in report.TARGETS + report.BOUND_TARGETS}
    assert evaluated >= len(keys)


def test_markdown_and_charts_are_written(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = tiny_run
    text = (out / "results.md").read_text()
    for workload in WORKLOADS:
        assert f"## {workload}" in text
        png = out / f"{workload}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for system in results["systems"].values():
        assert system["label"] in text
    for target in results["targets"]:
        if target["met"] is not None:
            assert target["text"] in text
    assert not (out / "_data").exists(), "the data directory is removed after the run"


def test_ratio_direction_on_synthetic_numbers() -> None:
    """A system twice as slow as the bound gets 0.5x; a target needing 0.9x fails."""
    info = {"name": "w", "description": "d", "nbytes": 10**9, "n_tensors": 1}

    def m(system: str, times: list[float]) -> dict[str, Any]:
        return {"system": system, "op": "save_fsync", "times_s": times}

    out = {
        "workload": info,
        "measurements": [m(RAW, [1.0, 1.2, 0.8]), m("zarrckpt", [2.0, 2.4, 1.6]), m("dcp", [4.0])],
    }
    results = report.build_results([out], {"mode": "test"}, [])
    row = report.lookup(results, "w", "zarrckpt", "save_fsync")
    assert row is not None
    assert row["ratio_to_raw"] == pytest.approx(0.5)
    assert row["gbps"] == pytest.approx(0.5)
    by_key = {t["key"]: t for t in results["targets"]}
    assert by_key["save_vs_raw"]["met"] is False
    assert by_key["save_vs_dcp"]["speedup"] == pytest.approx(2.0)
    assert by_key["save_vs_dcp"]["met"] is True
    assert by_key["load_warm_vs_mmap"]["met"] is None  # not measured: not claimed


def test_a_load_that_delivers_nothing_is_caught(tmp_path: Path) -> None:
    """The runner verifies every load against checksums of the saved data."""

    def no_load(wl: Any, path: str, options: Any) -> None:
        return None  # leaves the zeroed target as it is

    register_system(System("_lazy", "lazy", None, no_load, reads_from=RAW))
    try:
        result = run_worker(
            {
                "workload": "small_tensors",
                "size": "tiny",
                "systems": [RAW, "_lazy"],
                "ops": ["load_warm"],
                "warmup": 0,
                "repeats": 1,
                "data_dir": str(tmp_path),
            }
        )
    finally:
        del SYSTEMS["_lazy"]
    by_system = {m["system"]: m for m in result["measurements"]}
    assert by_system[RAW]["error"] is None and by_system[RAW]["verified_loads"] == 1
    assert "differs from the saved data" in by_system["_lazy"]["error"]
    assert by_system["_lazy"]["verified_loads"] == 0


def test_inode_cost_measures_every_case(tmp_path: Path) -> None:
    from benchmarks import inode_cost

    result = inode_cost.measure(str(tmp_path), n=5, repeats=2)
    assert result["arrays: dir + zarr.json + c/ + c/0"]["inodes"] == 20
    assert result["arrays: dir + zarr.json + c.0"]["inodes"] == 15
    for r in result.values():
        assert r["create_ms"] > 0 and r["sync_ms"] >= 0
        assert r["us_per_inode"] == pytest.approx(r["create_ms"] * 1e3 / r["inodes"])
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed at the end


def test_files_at_scale_runs_with_the_suite(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    """(g) runs after the timing workloads; its real saves have the files the
    projection predicts, load back bit-exact, and v3 files do not grow with ranks."""
    from benchmarks import _projection as proj
    from benchmarks import files_at_scale

    out, _ = tiny_run
    with open(out / "files_at_scale.json") as f:
        results = json.load(f)
    assert "## (g) files_at_scale" in (out / "files_at_scale.md").read_text()
    _, specs = proj.tensor_specs(proj.model_state(files_at_scale.real_parameters("tiny")))
    worlds = sorted({r["world_size"] for r in results["real"]})
    assert worlds == [1, 2]
    for row in results["real"]:
        predicted = proj.projected_counts(specs, row["world_size"])[row["layout"]]
        assert (row["files"], row["dirs"]) == (predicted["files"], predicted["dirs"]), row
        assert row["tensors"] == len(specs)
        if row["layout"] == "dcp":
            assert row["entries"] == predicted["entries"]
        else:
            assert row["loads_bit_exact"] is True
    v3 = {r["files"] for r in results["real"] if r["layout"] == "zarrckpt v3 shard"}
    assert len(v3) == 1
    assert all(t["met"] for t in results["targets"])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8, 64])
def test_projection_equals_the_real_planner(world: int) -> None:
    """The per-shape shortcut gives the counts of plan_arrays + plan_storage on every
    piece (uneven rows and empty trailing ranks included: vocab 50, 10 KV rows)."""
    from benchmarks import _projection as proj

    model = proj.ModelShape(layers=2, hidden=16, intermediate=40, vocab=50, kv_heads=5, head_dim=2)
    tree, specs = proj.tensor_specs(proj.model_state(model.parameters()))
    projected = proj.projected_counts(specs, world)
    planned = proj.planned_counts(specs, world)
    for layout in planned:
        assert projected[layout] == planned[layout], layout
    # v3 shard files: zarr.json + one file per array, whatever the world size
    assert projected["zarrckpt v3 shard"]["files"] == 2 + 2 * len(specs)
    assert projected["zarrckpt v3 shard"]["dirs"] == 2 + len(specs)
    assert projected["dcp"]["files"] == world + 1
    _, entries = proj.dcp_metadata(specs, world)
    assert entries == projected["dcp"]["entries"]
    if world > 1:
        assert projected["zarrckpt v1/v2"]["files"] > 2 + 2 * len(specs)


def test_projection_manifest_carries_the_crc_tables() -> None:
    """Manifest bytes grow with the crc32c tables (4 bytes per position, base64)."""
    from benchmarks import _projection as proj

    model = proj.ModelShape(layers=1, hidden=64, intermediate=96, vocab=128, kv_heads=2, head_dim=8)
    tree, specs = proj.tensor_specs(proj.model_state(model.parameters()))
    small, _ = proj.manifest(tree, specs, 2, "zarrckpt v3 shard")
    large, _ = proj.manifest(tree, specs, 16, "zarrckpt v3 shard")
    old, _ = proj.manifest(tree, specs, 16, "zarrckpt v1/v2")
    positions = {
        w: sum(proj._counts(s.shape, 4, s.sharded, w).shard.crc_table_size for s in specs.values())
        for w in (2, 16)
    }
    # base64 of 4 bytes per extra position, plus the longer sharding / shape text
    assert large - small >= 4 * (positions[16] - positions[2]) * 4 // 3
    assert old < small  # no crc tables, no consolidated metadata


def test_object_store_benchmark_runs_tiny(tmp_path: Path) -> None:
    """Workload (s3): every system saves and loads on the loopback S3 server, loads
    are bit-exact, and the counting proxy saw the requests of each checkpoint."""
    from benchmarks import object_store

    results = object_store.run("tiny")
    rows = results["rows"]
    assert {(r["workload"], r["system"], r["op"]) for r in rows} == {
        (w, s, op)
        for w in ("gpt", "small")
        for s in object_store.SYSTEMS
        for op in ("save", "load")
    }
    for r in rows:
        assert r["bit_exact"], r
        assert r["requests"] == sum(r["requests_by_method"].values()) > 0, r
        assert r["median_s"] > 0
    small_saves = [r for r in rows if r["workload"] == "small" and r["op"] == "save"]
    zc = next(r for r in small_saves if r["system"] == "zarrckpt")
    assert zc["requests_by_method"]["PUT"] >= zc["tensors"]  # one object per tensor at least
    json_path, md_path = object_store.write(results, str(tmp_path))
    assert json.loads(Path(json_path).read_text()) == results
    assert Path(md_path).read_text() == object_store.markdown(results)
    assert "| small (" in Path(md_path).read_text()
