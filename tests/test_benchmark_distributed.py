"""The distributed benchmark runs end to end in a tiny configuration, and its
summary ratios are computed from what it measured."""

from __future__ import annotations

import json

from benchmarks import distributed


def test_distributed_benchmark_tiny(tmp_path):
    out = tmp_path / "out"
    assert distributed.main(["--gib", "0.02", "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads((out / "distributed.json").read_text())
    assert result["fsdp2_ws2_equal"] is True
    timings = result["fsdp2_ws2"]
    for system in ("zarrckpt", "dcp"):
        for op in ("save", "load warm", "load cold"):
            entry = timings[f"{system} {op}"]
            assert entry["median_s"] > 0
            assert entry["gb_per_s"] == (result["gib"] * (1 << 30)) / entry["median_s"] / 1e9
    for key in ("reshard_4to2", "reshard_2to4"):
        per_rank = result[key]["per_rank"]
        assert result[key]["zarrckpt_max_ratio"] == max(
            r["zarrckpt"] / r["needed"] for r in per_rank
        )
        assert result[key]["zarrckpt_max_ratio"] <= 1.1
    # DCP reads whole 2-rank pieces when 4 ranks each need half of one
    assert result["reshard_2to4"]["dcp_max_ratio"] >= 1.5
    assert "| reshard |" in (out / "distributed.md").read_text()
