"""zarrckpt.testing.run_distributed: results in rank order, failures reported, no hang."""

from __future__ import annotations

import time

import pytest

from zarrckpt.testing import DistributedTestError, run_distributed


def _fail_or_block(rank: int, world_size: int) -> int:
    if rank == 0:
        raise ValueError("rank 0 gives up")
    time.sleep(600)  # a rank stuck elsewhere (I/O, another group's collective)
    return rank


def test_a_failing_rank_does_not_leave_the_others_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="rank 0 gives up"):
        run_distributed(_fail_or_block, 2, timeout=300, failure_grace=1.0)
    # spawn + rendezvous take seconds; without the grace period this waits for the
    # 300 s timeout
    assert time.monotonic() - start < 120
