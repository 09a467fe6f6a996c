"""A collective load whose ranks open different versions of the checkpoint (it was
replaced while they opened it) raises on every rank and loads nothing, instead
of filling each rank's shards from another checkpoint."""

from __future__ import annotations

import _version_cases as cases
import torch

import zarrckpt
from zarrckpt.testing import run_distributed


def test_ranks_that_opened_different_versions_load_nothing(tmp_path):
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"w": torch.full((8,), 1.0)}, path)
    results = run_distributed(cases.replaced_between_opens, 2, path)
    for rank, r in enumerate(results):
        assert r["error"] is not None and "replaced while the ranks opened it" in r["error"], (
            rank, r)
        assert r["w"] == [0.0] * 8, (rank, r)  # nothing loaded
    # and a load after the replacement sees one version on every rank
    out = {"w": torch.zeros(8)}
    zarrckpt.load(out, path)
    assert out["w"].tolist() == [2.0] * 8


def test_ranks_loading_one_file_each_are_not_compared(tmp_path):
    results = run_distributed(cases.per_rank_files, 2, str(tmp_path))
    assert results == [[0.0] * 4, [1.0] * 4]
