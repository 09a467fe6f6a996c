"""Concurrent saves and loads of one path (issue #14).

* Racing writers: two processes save to the same new path at once with
  ``overwrite=False``; one wins, the other gets ``CheckpointExistsError``
  (never a raw ``FileExistsError``/``OSError``), and the winner's checkpoint
  loads whole.
* Readers during an overwrite: one process overwrites a checkpoint again and
  again (8 tensors, all 1.0 or all 2.0, alternating) while this one loads it in a
  loop; every load returns one version whole or raises a ``ZarrCkptError``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import pytest
import torch

import zarrckpt
from zarrckpt.errors import CheckpointExistsError, ZarrCkptError
from zarrckpt.storage import _posix
from zarrckpt.storage._local import LocalStore

RACES = 30
N_TENSORS = 8
NUMEL = 1 << 17  # 512 KiB per tensor, 4 MiB per checkpoint
OVERWRITE_SECONDS = 4.0


def _small() -> dict[str, Any]:
    return {f"t{i}": torch.full((256,), float(i)) for i in range(4)}


def _race_worker(base: str, races: int, barrier: Any, results: Any, me: int) -> None:
    state = _small()
    state["who"] = me
    outcomes = []
    for i in range(races):
        barrier.wait()
        try:
            zarrckpt.save(state, os.path.join(base, f"r{i}"), fsync=False)
            outcomes.append("won")
        except CheckpointExistsError:
            outcomes.append("exists")
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcomes.append(f"raw {type(e).__name__}: {e}")
    results.put((me, outcomes))


def test_racing_writers_get_checkpoint_exists_error(tmp_path: Any) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(str(tmp_path), RACES, barrier, results, me))
        for me in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    raw = [o for me in outcomes for o in outcomes[me] if o.startswith("raw")]
    assert raw == [], raw
    for i in range(RACES):
        pair = sorted((outcomes[0][i], outcomes[1][i]))
        assert pair == ["exists", "won"], (i, pair)
        winner = 0 if outcomes[0][i] == "won" else 1
        assert zarrckpt.open(os.path.join(tmp_path, f"r{i}")).state_dict()["who"] == winner
    print(f"{RACES} races of 2 processes: {RACES} won, {RACES} CheckpointExistsError")


def test_publish_over_a_path_that_appeared_after_the_check(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lost race made deterministic: the other save publishes between this
    save's last check and its rename."""
    path = str(tmp_path / "ckpt")
    real = _posix._renameat2
    raced: list[str] = []

    def other_save_wins(src: str, dst: str, flags: int) -> bool:
        if flags == _posix._RENAME_NOREPLACE and not raced:
            raced.append(dst)
            zarrckpt.save({"x": torch.ones(3)}, dst, fsync=False)
        return real(src, dst, flags)

    monkeypatch.setattr(_posix, "_renameat2", other_save_wins)
    with pytest.raises(CheckpointExistsError, match="already exists") as info:
        zarrckpt.save({"x": torch.zeros(3)}, path, fsync=False)
    assert path in str(info.value)
    monkeypatch.undo()
    target = {"x": torch.zeros(3)}
    zarrckpt.load(target, path)
    assert torch.equal(target["x"], torch.ones(3))  # the winner, whole
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no staging left


def _version(value: float) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((NUMEL,), value) for i in range(N_TENSORS)}


def _overwriter(path: str, seconds: float, ready: Any, results: Any) -> None:
    saves = 0
    deadline = time.monotonic() + seconds
    ready.set()
    while time.monotonic() < deadline:
        zarrckpt.save(_version(2.0 if saves % 2 == 0 else 1.0), path, overwrite=True, fsync=False)
        saves += 1
    results.put(saves)


def test_loads_during_overwrites_are_never_mixed(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    zarrckpt.save(_version(1.0), path, fsync=False)
    ctx = mp.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    writer = ctx.Process(target=_overwriter, args=(path, OVERWRITE_SECONDS, ready, results))
    writer.start()
    assert ready.wait(120)
    whole = mixed = errors = 0
    examples: list[str] = []
    target = {f"t{i}": torch.zeros(NUMEL) for i in range(N_TENSORS)}
    deadline = time.monotonic() + OVERWRITE_SECONDS
    while time.monotonic() < deadline:
        try:
            zarrckpt.load(target, path)
        except ZarrCkptError as e:
            errors += 1
            if len(examples) < 3:
                examples.append(str(e))
            continue
        values = {float(t[0]) for t in target.values()} | {float(t[-1]) for t in target.values()}
        if len(values) == 1:
            whole += 1
        else:
            mixed += 1
    saves = results.get(timeout=120)
    writer.join(timeout=30)
    print(f"{saves} overwrites; loads: {whole} whole, {mixed} mixed, {errors} raised {examples}")
    assert saves > 0 and whole > 0
    assert mixed == 0, f"{mixed} of {whole + mixed + errors} loads mixed two checkpoints"
    LocalStore(path).read_committed_root()  # the last one is committed and readable
