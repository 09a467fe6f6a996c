"""Resharding through an S3 server on loopback: 2 gloo ranks save FSDP2 and TP
checkpoints; TP ws2 -> FSDP2 ws2 on the same ranks and FSDP2 ws2 -> one
process, every tensor bit-exact (tests/_object_store_cases.py)."""

from __future__ import annotations

import _object_store_cases as cases
import pytest

from zarrckpt.testing import run_distributed


@pytest.mark.slow
def test_reshard_through_s3(s3_server, s3_url, tmp_path):
    options = s3_server.options()
    results = run_distributed(cases.save_both_then_reshard, 2, s3_url, options, str(tmp_path))
    for rank, result in enumerate(results):  # TP ws2 -> FSDP2 ws2
        assert result["compared"] > 0
        assert result["mismatched"] == [], (rank, result)
    # FSDP2 ws2 -> a single process
    single = cases.load_layout(
        0, 1, f"{s3_url}/fsdp2", options, "single", str(tmp_path / "fsdp2.pt")
    )
    assert single["compared"] > 0
    assert single["mismatched"] == [], single
