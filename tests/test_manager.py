"""CheckpointManager: retention (pure and on real saves), step listing, incomplete
steps, restore, metrics, argument errors, async saves and their errors."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path
from typing import Any

import _manager_cases as cases
import pytest
import torch

import zarrckpt
from zarrckpt.cli import main as cli_main
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    DistributedSaveError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    StorageError,
    UnsupportedValueError,
)
from zarrckpt.manager import steps_to_delete
from zarrckpt.testing import run_distributed

# ----------------------------------------------------------------- retention, pure


@pytest.mark.parametrize(
    ("steps", "kwargs", "deleted"),
    [
        ([], {"keep_last": 2}, []),
        ([5], {"keep_last": 1}, []),
        ([0, 1, 2, 3], {"keep_last": 2}, [0, 1]),
        ([3, 0, 2, 1], {"keep_last": 2}, [0, 1]),  # order of the input does not matter
        ([0, 1, 2, 3], {"keep_last": None}, []),  # both counts off: keep everything
        ([0, 1, 2, 3], {"keep_last": None, "keep_every": 2}, []),
        ([0, 1, 2, 3, 4, 5, 6], {"keep_last": 2, "keep_every": 3}, [1, 2, 4]),
        ([10, 20, 30, 40], {"keep_last": 1, "keep_every": 20}, [10, 30]),
        # best by min: 1 (0.1) and 3 (0.2); newest 4 always kept
        ([0, 1, 2, 3, 4], {"keep_last": None, "keep_best": 2,
                           "metric_values": {0: 0.5, 1: 0.1, 2: 0.9, 3: 0.2, 4: 0.8}},
         [0, 2]),
        ([0, 1, 2, 3, 4], {"keep_last": None, "keep_best": 2, "best_mode": "max",
                           "metric_values": {0: 0.5, 1: 0.1, 2: 0.9, 3: 0.2, 4: 0.8}},
         [0, 1, 3]),  # best 2 (0.9) and 4 (0.8), which is also the newest
        # ties go to the newer step; missing, NaN and non-numbers never rank
        ([0, 1, 2, 3], {"keep_last": None, "keep_best": 1,
                        "metric_values": {0: 0.1, 1: 0.1, 2: math.nan}}, [0, 2]),
        ([0, 1, 2, 3], {"keep_last": None, "keep_best": 2,
                        "metric_values": {0: "low", 1: None, 2: True}}, [0, 1, 2]),
        # union of all rules
        ([0, 1, 2, 3, 4, 5, 6, 7], {"keep_last": 2, "keep_every": 4, "keep_best": 1,
                                    "metric_values": {2: -1.0}}, [1, 3, 5]),
    ],
)
def test_steps_to_delete(steps: list[int], kwargs: dict[str, Any], deleted: list[int]) -> None:
    assert steps_to_delete(steps, **kwargs) == deleted


def test_steps_to_delete_never_deletes_the_newest_and_keeps_every_rule() -> None:
    steps = [0, 2, 3, 5, 6, 9, 10, 12]
    values = {s: (s * 7) % 5 for s in steps}
    for keep_last, keep_every, keep_best, mode in itertools.product(
        [None, 1, 2, 5], [None, 1, 3, 4], [None, 1, 3], ["min", "max"]
    ):
        deleted = steps_to_delete(steps, keep_last=keep_last, keep_every=keep_every,
                                  keep_best=keep_best, metric_values=values, best_mode=mode)
        kept = [s for s in steps if s not in deleted]
        assert steps[-1] in kept
        assert set(deleted) <= set(steps)
        if keep_last is None and keep_best is None:
            assert deleted == []
            continue
        if keep_last is not None:
            assert set(steps[-keep_last:]) <= set(kept)
        if keep_every is not None:
            assert {s for s in steps if s % keep_every == 0} <= set(kept)
        if keep_best is not None:
            ranked = sorted(steps, key=lambda s: (values[s] if mode == "min" else -values[s], -s))
            assert set(ranked[:keep_best]) <= set(kept)
        # nothing else is kept
        expected = {steps[-1]}
        expected |= set(steps[-keep_last:]) if keep_last else set()
        expected |= {s for s in steps if keep_every and s % keep_every == 0}
        expected |= set(ranked[:keep_best]) if keep_best else set()
        assert set(kept) == expected


# ----------------------------------------------------------------- real saves


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((5,), value), "b": torch.arange(3), "step": int(value)}


@pytest.mark.parametrize(
    ("kwargs", "losses", "kept"),
    [
        ({"keep_last": 2}, None, [6, 7]),
        ({"keep_last": 2, "keep_every": 3}, None, [0, 3, 6, 7]),
        ({"keep_last": 1, "keep_best": 2, "best_metric": "loss"},
         [5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 6.0, 7.0], [1, 3, 7]),
        ({"keep_last": 1, "keep_every": 4, "keep_best": 1, "best_metric": "loss",
          "best_mode": "max"}, [5.0, 1.0, 9.0, 0.5, 3.0, 2.0, 6.0, 7.0], [0, 2, 4, 7]),
        ({"keep_last": None}, None, [0, 1, 2, 3, 4, 5, 6, 7]),
    ],
)
def test_retention_on_real_saves(
    tmp_path: Path, kwargs: dict[str, Any], losses: list[float] | None, kept: list[int]
) -> None:
    manager = zarrckpt.CheckpointManager(tmp_path / "run", fsync=False, **kwargs)
    for step in range(8):
        metrics = {"loss": losses[step]} if losses else None
        assert manager.save(step, _state(float(step)), metrics=metrics)
    assert manager.all_steps() == kept
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        f"step_{s:08d}" for s in kept
    ]
    for step in kept:  # every kept step is intact and holds its own state
        target = _state(0.0)
        assert manager.restore(target, step) == step
        assert torch.equal(target["w"], torch.full((5,), float(step))) and target["step"] == step


def test_save_every_force_and_step_directories(tmp_path: Path) -> None:
    manager = zarrckpt.CheckpointManager(str(tmp_path / "run"), save_every=5, step_digits=4,
                                         keep_last=None, fsync=False)
    assert manager.all_steps() == [] and manager.latest_step() is None
    saved = [s for s in range(12) if manager.save(s, _state(float(s)))]
    assert saved == [0, 5, 10]
    assert manager.save(11, _state(11.0), force=True)
    assert manager.all_steps() == [0, 5, 10, 11] and manager.latest_step() == 11
    assert manager.step_path(11) == f"{tmp_path}/run/step_0011"
    # each step is a normal checkpoint: open() shows the step and metrics in the manifest
    assert zarrckpt.open(manager.step_path(5)).metadata["manager"] == {"step": 5, "metrics": {}}
    with pytest.raises(CheckpointExistsError, match="step 5 is already saved"):
        manager.save(5, _state(0.0))
    assert manager.all_steps() == [0, 5, 10, 11]


def test_metrics_round_trip(tmp_path: Path) -> None:
    manager = zarrckpt.CheckpointManager(tmp_path / "run", fsync=False)
    metrics = {"loss": torch.tensor(0.25), "acc": 0.5, "n": 3, "nan": math.nan,
               "inf": -math.inf, "tag": "warmup", "ok": True, "none": None}
    manager.save(0, _state(0.0), metrics=metrics)
    got = manager.metrics(0)
    assert math.isnan(got.pop("nan"))
    assert got == {"loss": 0.25, "acc": 0.5, "n": 3, "inf": -math.inf, "tag": "warmup",
                   "ok": True, "none": None}
    manager.save(1, _state(1.0))
    assert manager.metrics(1) == {}
    with pytest.raises(CheckpointNotFoundError, match="no step 7"):
        manager.metrics(7)
    with pytest.raises(UnsupportedValueError, match="metric 'x' of step 2 is a list"):
        manager.save(2, _state(2.0), metrics={"x": [1, 2]})
    with pytest.raises(UnsupportedValueError, match="metric names must be str"):
        manager.save(2, _state(2.0), metrics={1: 2.0})
    assert manager.all_steps() == [0, 1]  # nothing saved by the refused calls


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": 0}, "keep_last must be a positive int"),
        ({"keep_every": -2}, "keep_every must be a positive int"),
        ({"save_every": 0}, "save_every must be a positive int"),
        ({"keep_best": 2}, "keep_best needs best_metric"),
        ({"best_mode": "lowest"}, "best_mode must be 'min' or 'max'"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        zarrckpt.CheckpointManager(tmp_path, **kwargs)


def test_invalid_step(tmp_path: Path) -> None:
    manager = zarrckpt.CheckpointManager(tmp_path / "run")
    for step in (-1, 1.0, True):
        with pytest.raises(InvalidArgumentError, match="step must be an int >= 0"):
            manager.save(step, _state(0.0))  # type: ignore[arg-type]


# ----------------------------------------------------------------- incomplete steps


def _make_incomplete(manager: Any, root: Path) -> None:
    """Step 9: a checkpoint without commit marker (an object store's killed save);
    step 11: the staging of a killed local save."""
    shutil.copytree(manager.step_path(manager.latest_step()), root / "step_00000009")
    shutil.rmtree(root / "step_00000009" / "~commit")
    (root / ".step_00000011.zarrckpt-tmp-0123456789ab").mkdir()
    (root / ".step_00000011.zarrckpt-tmp-0123456789ab" / "chunk").write_bytes(b"x" * 10)


def test_incomplete_steps_are_listed_never_restored_and_removed_by_the_next_save(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    manager = zarrckpt.CheckpointManager(root, keep_last=None, fsync=False)
    manager.save(3, _state(3.0))
    _make_incomplete(manager, root)
    assert manager.all_steps() == [3] and manager.latest_step() == 3
    assert manager.incomplete_steps() == [9, 11]
    target = _state(0.0)
    assert manager.restore(target) == 3 and target["step"] == 3
    with pytest.raises(IncompleteCheckpointError, match="step 9 .* is incomplete"):
        manager.restore(_state(0.0), step=9)
    with pytest.raises(CheckpointNotFoundError, match=r"no step 4 .*committed steps \[3\]"):
        manager.restore(_state(0.0), step=4)
    # the next save removes both and may reuse an incomplete step
    assert manager.save(9, _state(9.0))
    assert manager.incomplete_steps() == [] and manager.all_steps() == [3, 9]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000009"]


def test_restore_without_committed_step(tmp_path: Path) -> None:
    manager = zarrckpt.CheckpointManager(tmp_path / "nothing")
    with pytest.raises(CheckpointNotFoundError, match="no committed step to restore"):
        manager.restore(_state(0.0))
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / ".step_00000001.zarrckpt-tmp-0123456789ab").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"incomplete steps \[1\] are never"):
        manager.restore(_state(0.0))


def test_a_cut_short_deletion_leaves_an_incomplete_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zarrckpt.storage import _posix

    root = tmp_path / "run"
    manager = zarrckpt.CheckpointManager(root, keep_last=1, fsync=False)
    manager.save(0, _state(0.0))
    real = _posix.remove_tree
    calls: list[str] = []

    def remove_marker_then_fail(path: str) -> None:
        calls.append(path)
        if len(calls) == 2:  # the step directory itself, after its marker
            raise KeyboardInterrupt("killed")
        real(path)

    monkeypatch.setattr(_posix, "remove_tree", remove_marker_then_fail)
    with pytest.raises(KeyboardInterrupt):
        manager.save(1, _state(1.0))
    monkeypatch.setattr(_posix, "remove_tree", real)
    assert calls[0].endswith("step_00000000/~commit")
    assert manager.all_steps() == [1] and manager.incomplete_steps() == [0]
    assert manager.restore(_state(5.0)) == 1
    manager.save(2, _state(2.0))
    assert manager.all_steps() == [2] and manager.incomplete_steps() == []


# ----------------------------------------------------------------- async


def test_async_saves_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from zarrckpt import api

    # each save is held until its own event: step 2 stays in flight until released
    releases = [threading.Event(), threading.Event()]
    calls: list[int] = []
    real = api.save_collective

    def held(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls))
        releases[min(len(calls) - 1, 1)].wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "save_collective", held)
    manager = zarrckpt.CheckpointManager(tmp_path / "run", async_save=True, keep_last=1,
                                         fsync=False)
    with manager:
        state = _state(1.0)
        assert manager.save(1, state)
        state["w"].fill_(-1.0)  # the save holds the values at call time
        # in flight: not committed, not reported as incomplete by the manager, but a
        # staging on disk (what `zarrckpt ls` shows as incomplete)
        assert manager.all_steps() == [] and manager.incomplete_steps() == []
        threading.Timer(0.2, releases[0].set).start()
        assert manager.save(2, _state(2.0))  # waits for step 1 first
        assert manager.all_steps() == [1]
        assert manager.last_wait_seconds > 0
        releases[1].set()
        waited = manager.wait()
        assert isinstance(waited, float)
        assert manager.all_steps() == [2]  # retention ran once step 2 committed
    target = _state(0.0)
    assert manager.restore(target, 2) == 2


def test_background_error_on_one_rank_raised_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zarrckpt.storage import _posix

    for name in cases.WRITE_CALLS:  # the hooks below are undone after the test
        monkeypatch.setattr(_posix, name, getattr(_posix, name))
    switch = cases.fail_writes_on(0, 0)
    manager = zarrckpt.CheckpointManager(tmp_path / "run", async_save=True, fsync=False)
    switch[0] = True
    try:
        manager.save(0, _state(0.0))
        # one process: the storage error itself (StorageError, errno kept)
        with pytest.raises((DistributedSaveError, StorageError),
                           match="background save of step 0 .* EIO|injected I/O error"):
            manager.wait()
    finally:
        switch[0] = False
    manager.wait()  # raised once
    assert manager.incomplete_steps() == [] and manager.all_steps() == []


@pytest.mark.slow
def test_two_ranks_background_error_on_every_rank_and_retention_agreed(tmp_path: Path) -> None:
    results = run_distributed(cases.two_rank_cases, 2, str(tmp_path))
    for rank, (seen, retained) in enumerate(results):
        # rank 1's writes fail in the background; both ranks raise at the next call,
        # rank 1 its own storage error, rank 0 DistributedSaveError naming rank 1
        error = "StorageError" if rank == 1 else "DistributedSaveError"
        expected = [f"{call}: {error}" for call in ("save", "wait", "restore", "close")]
        assert seen[:4] == expected, seen
        assert seen[4] == "steps [8], incomplete []", seen
        # keep_last 1 -> 6, keep_every 3 -> 0, 3, 6, best acc (max) -> 1
        assert retained == [0, 1, 3, 6]


# ----------------------------------------------------------------- command line


def test_cli_ls_and_gc_on_a_manager_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    import json

    root = tmp_path / "run"
    manager = zarrckpt.CheckpointManager(root, keep_last=2, fsync=False)
    for step in range(3):
        manager.save(step, _state(float(step)), metrics={"loss": 1.0 / (step + 1)})
    _make_incomplete(manager, root)
    capsys.readouterr()
    assert cli_main(["ls", "--json", str(root)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(s["step"], s["state"]) for s in listing["steps"]] == [
        (1, "committed"), (2, "committed"), (9, "incomplete"), (11, "incomplete")
    ]
    assert listing["steps"][0]["metrics"] == {"loss": 0.5}
    assert listing["steps"][0]["bytes"] > 0 and listing["steps"][0]["created"]
    assert listing["steps"][3]["bytes"] == 10
    assert cli_main(["ls", "--plain", str(root)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["step", "state", "bytes", "created", "metrics"]
    assert text[1].split()[:2] == ["1", "committed"] and text[1].endswith("loss=0.5")
    # ls on one step's checkpoint still lists its tensors
    assert cli_main(["ls", "--plain", manager.step_path(2)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "name", "w", "b"
    ]
    assert cli_main(["gc", "--dry-run", str(root)]) == 0
    assert "would remove 2 incomplete entries" in capsys.readouterr().out
    assert manager.incomplete_steps() == [9, 11]
    assert cli_main(["gc", "--json", str(root)]) == 0
    removed = json.loads(capsys.readouterr().out)["removed"]
    assert [(r["step"], r["entry"]) for r in removed] == [
        (9, "step_00000009"), (11, ".step_00000011.zarrckpt-tmp-0123456789ab")
    ]
    assert manager.incomplete_steps() == [] and manager.all_steps() == [1, 2]
    assert cli_main(["gc", str(manager.step_path(2))]) == 2  # not a manager root
    assert "not a checkpoint manager root" in capsys.readouterr().err
