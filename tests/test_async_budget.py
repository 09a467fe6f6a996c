"""async_save with a staging budget: a state larger than the budget is copied in
turns (budget + one piece of extra host memory at most), never doubled."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bits_equal

import zarrckpt
from zarrckpt.errors import InvalidArgumentError
from zarrckpt.parallel import _turns
from zarrckpt.testing import run_distributed

MiB = 1 << 20


def _state(seed: int, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # n x 4 MiB; bf16 and float32 mixed
    return {
        f"w{i}": torch.randn(1024, 1024 if i % 2 else 512, generator=g).to(
            torch.float32 if i % 2 else torch.bfloat16
        )
        for i in range(n)
    }


def test_state_larger_than_the_budget_is_staged_in_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[int] = []
    real = _turns.batches

    def recorded(pieces: Any, budget: int) -> Any:
        for group in real(pieces, budget):
            groups.append(sum(p.nbytes for p in group))
            yield group

    monkeypatch.setattr(_turns, "batches", recorded)
    state = _state(0)  # 20 MiB
    expected = {k: v.clone() for k, v in state.items()}
    budget, piece = 4 * MiB, 1 * MiB
    # warm up: the first save imports modules, which tracemalloc would count
    zarrckpt.async_save(_state(9, n=2), tmp_path / "warm", fsync=False, chunk_bytes=piece,
                        staging_budget_bytes=budget).result(timeout=120)
    groups.clear()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        future = zarrckpt.async_save(
            state, tmp_path / "c", fsync=False, chunk_bytes=piece, staging_budget_bytes=budget
        )
        future.staged.result(timeout=120)
        for t in state.values():  # the caller may now modify its tensors
            t.zero_()
        future.result(timeout=120)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    total = sum(t.numel() * t.element_size() for t in expected.values())
    assert total == 20 * MiB
    # the copies were made in turns of at most the budget (the numpy copies are what
    # tracemalloc sees: all at once would have been 20 MiB)
    assert len(groups) >= 5 and max(groups) <= budget and sum(groups) == total, groups
    # within the budget plus one piece (and a little bookkeeping), far below the state
    assert peak <= budget + piece + MiB, peak
    ckpt = zarrckpt.open(tmp_path / "c")
    for key, tensor in expected.items():
        assert_bits_equal(tensor, ckpt.read(key))


def test_batches_hold_at_most_the_budget_or_one_piece() -> None:
    class Piece:
        def __init__(self, n: int) -> None:
            self.nbytes = n

    sizes = [3, 3, 3, 10, 1, 1, 4]
    groups = list(_turns.batches([Piece(n) for n in sizes], 6))  # type: ignore[misc]
    assert [[p.nbytes for p in g] for g in groups] == [[3, 3], [3], [10], [1, 1, 4]]


def test_state_within_the_budget_is_staged_before_returning(tmp_path: Path) -> None:
    state = _state(1, n=2)
    expected = {k: v.clone() for k, v in state.items()}
    future = zarrckpt.async_save(state, tmp_path / "c", fsync=False, staging_budget_bytes=64 * MiB)
    assert future.staged.done()  # copied before the call returned, as without a budget
    for t in state.values():
        t.zero_()
    future.result(timeout=120)
    for key, tensor in expected.items():
        assert_bits_equal(tensor, zarrckpt.open(tmp_path / "c").read(key))


def test_without_a_budget_staged_is_resolved_on_return(tmp_path: Path) -> None:
    future = zarrckpt.async_save({"w": torch.ones(3)}, tmp_path / "c", fsync=False)
    assert future.staged.done()
    future.result(timeout=60)


@pytest.mark.parametrize("budget", [0, -1, 1.5, "1"])
def test_bad_budget_is_refused(tmp_path: Path, budget: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="staging_budget_bytes"):
        zarrckpt.async_save({"w": torch.ones(3)}, tmp_path / "c", staging_budget_bytes=budget)


def test_a_failing_save_fails_staged_too(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "unrelated.txt").write_text("not a checkpoint")
    future = zarrckpt.async_save(
        _state(2, n=2), tmp_path / "c", fsync=False, overwrite=True, staging_budget_bytes=MiB
    )
    with pytest.raises(zarrckpt.errors.ZarrCkptError):
        future.result(timeout=60)
    assert future.staged.done() and future.staged.exception() is not None


def _budget_two_ranks(rank: int, world_size: int, path: str) -> bool:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = _state(3, n=4)
    state = {k: distribute_tensor(v.float(), mesh, [Shard(0)]) for k, v in full.items()}
    future = zarrckpt.async_save(
        state, path, fsync=False, chunk_bytes=MiB, staging_budget_bytes=MiB
    )
    future.staged.result(timeout=120)
    for t in state.values():
        t.to_local().zero_()
    future.result(timeout=120)
    ckpt = zarrckpt.open(path)
    return all(torch.equal(ckpt.read(k), v.float()) for k, v in full.items())


def test_budget_on_two_ranks(tmp_path: Path) -> None:
    assert run_distributed(_budget_two_ranks, 2, str(tmp_path / "c")) == [True, True]
