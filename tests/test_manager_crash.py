"""Acceptance of the checkpoint manager: training jobs SIGKILLed at random points
resume, with another world size, from the newest complete step and continue
bit-exactly like an uninterrupted run.

Each job is 1 or 2 rank processes (tests/_manager_train.py, gloo, CPU) in a
session of their own; the kill takes down every rank at once (``killpg``), as
a node failure or a scheduler's kill would. A chain of jobs alternates world
sizes: killed during a sync save, killed during an async save, killed while
retention deletes an old step, then a job that runs to the end. After each
kill the test checks what is on disk: the resumed job must restore the newest
committed step (never an incomplete one) and reproduce the reference losses
from the next step on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import zarrckpt

SCRIPT = Path(__file__).with_name("_manager_train.py")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 16


def _job(tmp: Path, root: Path, losses: Path, world_size: int, *, async_save: bool,
         kill: dict[str, Any] | None) -> int:
    """Run one job; return its exit status (-9: killed)."""
    rendezvous = tmp / f"rdzv-{random.random()}"
    config = {"root": str(root), "losses": str(losses), "world_size": world_size,
              "rendezvous": str(rendezvous), "steps": STEPS, "async": async_save, "kill": kill}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # one shell per job in a session of its own: its ranks share its process group,
    # which a rank's kill hook takes down as a whole
    ranks = " ".join(
        f"{sys.executable} {SCRIPT} '{json.dumps(config)}' {rank} & pids=\"$pids $!\";"
        for rank in range(world_size)
    )
    shell = f"pids=; {ranks} status=0; for p in $pids; do wait $p || status=$?; done; exit $status"
    proc = subprocess.Popen(["bash", "-c", shell], env=env, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"job exited with {proc.returncode}:\n{err.decode()}")
    return proc.returncode


def _losses(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].startswith(("0x", "-0x")):
                out[int(parts[0])] = parts[1]
    return out


@pytest.mark.slow
def test_killed_jobs_resume_with_another_world_size_bit_exact(tmp_path: Path) -> None:
    reference_losses = tmp_path / "reference.txt"
    assert _job(tmp_path, tmp_path / "reference", reference_losses, 1, async_save=False,
                kill=None) == 0
    reference = _losses(reference_losses)
    assert sorted(reference) == list(range(STEPS))

    rng = random.Random(16)
    root = tmp_path / "run"
    plan: list[tuple[int, bool, dict[str, Any] | None]] = []
    for world_size in (1, 2):
        other = 3 - world_size
        plan += [
            (world_size, False, {"kind": "save", "skip": rng.randint(0, 1),
                                 "call": rng.randint(1, 8), "rank": rng.randrange(world_size)}),
            (other, True, {"kind": "save", "skip": rng.randint(0, 1),
                           "call": rng.randint(1, 8), "rank": rng.randrange(other)}),
            (world_size, rng.random() < 0.5, {"kind": "retention", "skip": rng.randint(0, 1),
                                              "call": rng.randint(1, 2),
                                              "after": rng.random() < 0.5}),
        ]
    plan.append((1, True, None))  # 1 after the last kill on 2 ranks
    resumed = []
    for i, (world_size, async_save, kill) in enumerate(plan):
        manager = zarrckpt.CheckpointManager(root, keep_last=2)
        newest = manager.latest_step()
        for step in manager.all_steps():  # committed steps are intact
            zarrckpt.open(manager.step_path(step)).verify()
        losses = tmp_path / f"losses-{i}.txt"
        code = _job(tmp_path, root, losses, world_size, async_save=async_save, kill=kill)
        assert code == (-signal.SIGKILL if kill else 0), (i, kill, code)
        got = _losses(losses)
        first = 0 if newest is None else newest + 1
        # resumed right after the newest committed step, never from an incomplete one
        assert got and min(got) == first, (i, sorted(got), newest)
        assert {s: reference[s] for s in got} == got, f"job {i} diverged ({kill})"
        resumed.append(newest)
    manager = zarrckpt.CheckpointManager(root, keep_last=2)
    assert manager.all_steps() == [STEPS - 2, STEPS - 1]
    assert manager.incomplete_steps() == []  # the final job's saves cleaned them up
    assert all(s is not None for s in resumed[2:]), resumed
