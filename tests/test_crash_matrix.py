"""Crash matrix: gloo groups of 2 and 4 ranks saving a small checkpoint, one rank or
every rank SIGKILLed at a named or a randomized point of the save.

Kill points (chosen from the outside: a hook installed in the forked rank by
patching ``zarrckpt.storage._posix`` / ``Comm._agree`` in that process pauses it
at the point, then the test SIGKILLs it; nothing in zarrckpt knows about them):

* ``entry``: before the rank called ``save`` at all (nothing written yet);
* ``chunk``: in the middle of a chunk file: half of its bytes written (the
  k-th data write of the rank, k seeded);
* ``precommit``: every chunk written, the rank entering the commit step;
* ``marker``: rank 0 wrote the root document, not the commit marker;
* ``rename``: rank 0 about to move the committed staging to the path;
* ``cleanup``: rank 0 published the new checkpoint, the previous one not yet deleted;
* ``random``: no hook; SIGKILL a seeded random delay (0-0.3 s, about the length
  of the save) after every rank started saving.

Each point is run over a new path and over an existing checkpoint (``overwrite=True``),
killing one rank (the others must raise a ``ZarrCkptError`` within
:data:`SURVIVOR_BOUND` seconds) or all ranks. After each kill the path holds the
previous checkpoint bit-exact, or (a kill after the rename, or a random kill
that came after it) the new one bit-exact, or, on a new path, nothing loadable
(``load`` raises a ``ZarrCkptError``); and a later save to the path succeeds.

A zygote process imports torch and zarrckpt once and forks the ranks of each
scenario; each forked group joins a fresh gloo group (file rendezvous).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from typing import Any

import pytest
import torch
from conftest import PYTHON, assert_bits_equal, save_fast

import zarrckpt
from zarrckpt.errors import ZarrCkptError

#: seconds a surviving rank may take to raise after a peer was SIGKILLed
SURVIVOR_BOUND = 60.0
SEED = 1405

STATE_SOURCE = r'''
import torch

def make_state(gen):
    """Deterministic ~100 KiB state of generation ``gen`` (several dtypes)."""
    g = torch.Generator().manual_seed(1000 + gen)
    return {
        "gen": gen,
        "w": torch.randn(64, 128, generator=g),
        "b": torch.randn(256, generator=g).to(torch.bfloat16),
        "i": torch.randint(-2**40, 2**40, (512,), generator=g),
        "u": torch.randint(0, 256, (33, 65), generator=g, dtype=torch.uint8),
        "f16": torch.randn(7, 9, generator=g).half(),
    }
'''

_ns: dict[str, Any] = {}
exec(STATE_SOURCE, _ns)
make_state = _ns["make_state"]

SAVE_OPTIONS = {"chunk_bytes": 4096, "inner_chunk_bytes": 1024, "fsync": False}

ZYGOTE_SOURCE = (
    STATE_SOURCE
    + r"""
import json, os, signal, sys, time, traceback
import torch
torch.set_num_threads(1)
import torch.distributed as dist
import zarrckpt
import zarrckpt.errors
import zarrckpt.storage._posix as posix
from zarrckpt.parallel._collective import Comm

OPTIONS = json.loads(sys.argv[1])


def rank_main(sc, rank):
    logf = open(sc["log"], "a", buffering=1)

    def log(*words):
        logf.write(" ".join(str(w) for w in (rank,) + words) + "\n")

    paused = sc["point"] != "random" and rank in sc["pause_ranks"]

    def hang():
        log("paused")
        time.sleep(600)

    dist.init_process_group("gloo", init_method="file://" + sc["rdzv"], rank=rank,
                            world_size=sc["world_size"])
    point = sc["point"]
    if paused and point == "chunk":
        count = [0]
        for name in ("write_file", "pwrite_all"):
            original = getattr(posix, name)

            def patched(*args, _original=original, _name=name, **kwargs):
                count[0] += 1
                if count[0] == sc["chunk_k"]:
                    args = list(args)
                    if _name == "write_file":  # (path, buffers): half of the bytes
                        data = b"".join(bytes(memoryview(b).cast("B")) for b in args[1])
                        args[1] = [data[: len(data) // 2]]
                    else:  # (fd, data, offset)
                        data = bytes(memoryview(args[1]).cast("B"))
                        args[1] = data[: len(data) // 2]
                    _original(*args, **kwargs)
                    hang()
                return _original(*args, **kwargs)

            setattr(posix, name, patched)
    elif paused and point == "precommit":
        agree = Comm._agree

        def patched_agree(self, step, what):
            if what.startswith("committing"):
                hang()
            return agree(self, step, what)

        Comm._agree = patched_agree
    elif paused and point == "marker":
        write_json = posix.write_json

        def patched_write_json(p, *a, **k):
            if p.endswith(posix.COMMIT_MARKER):
                hang()
            return write_json(p, *a, **k)

        posix.write_json = patched_write_json
    elif paused and point == "rename":
        posix._renameat2 = lambda *a, **k: hang()
    elif paused and point == "cleanup":
        renameat2 = posix._renameat2
        renamed = []

        def patched_renameat2(*a, **k):
            out = renameat2(*a, **k)
            renamed.append(True)
            return out

        def patched_remove_tree(*a, **k):
            if renamed:
                hang()
            return remove_tree(*a, **k)

        remove_tree = posix.remove_tree
        posix._renameat2 = patched_renameat2
        posix.remove_tree = patched_remove_tree
    state = make_state(sc["gen"])
    log("saving")
    if paused and point == "entry":
        hang()
    try:
        zarrckpt.save(state, sc["path"], overwrite=sc["overwrite"], **OPTIONS)
    except BaseException as e:
        is_z = isinstance(e, zarrckpt.errors.ZarrCkptError)
        msg = (type(e).__name__ + ": " + str(e)).replace("\n", " ")[:300]
        log("error", int(is_z), msg)
        os._exit(3)
    log("done")
    os._exit(0)


# warm up: the lazy imports and first-call work of a save and a load happen once here,
# not in every forked rank
import tempfile
with tempfile.TemporaryDirectory() as d:
    zarrckpt.save(make_state(0), d + "/warm", **OPTIONS)
    zarrckpt.load(make_state(0), d + "/warm")

signal.signal(signal.SIGCHLD, signal.SIG_IGN)
print("ready", flush=True)
for line in sys.stdin:
    sc = json.loads(line)
    pids = []
    for rank in range(sc["world_size"]):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                rank_main(sc, rank)
            except BaseException:
                with open(sc["log"], "a") as f:
                    f.write("%d crash %s\n" % (rank, traceback.format_exc().replace("\n", " | ")))
            os._exit(4)
        pids.append(pid)
    print(json.dumps(pids), flush=True)
"""
)

#: points only rank 0 reaches (it alone commits)
RANK0_POINTS = ("marker", "rename", "cleanup")
POINTS = ("entry", "chunk", "precommit", "marker", "rename", "cleanup", "random")


def _scenarios() -> list[dict[str, Any]]:
    """The matrix: every point x {2, 4 ranks} x {new path, overwrite} x {one, all},
    minus the cleanup point on a new path (nothing to clean up there); the
    random draws (rank to kill, chunk write, delay) come from one seeded RNG."""
    rng = random.Random(SEED)
    out = []
    for world_size in (2, 4):
        for point in POINTS:
            for overwrite in (False, True):
                if point == "cleanup" and not overwrite:
                    continue
                # three random draws for the random point: its delays cover the whole save
                for who in ("one", "all") * (3 if point == "random" else 1):
                    victim = 0 if point in RANK0_POINTS else rng.randrange(world_size)
                    out.append(
                        {
                            "world_size": world_size,
                            "point": point,
                            "overwrite": overwrite,
                            "who": who,
                            "victims": list(range(world_size)) if who == "all" else [victim],
                            "chunk_k": rng.randint(1, 3),
                            "delay": rng.uniform(0.0, 0.3),
                        }
                    )
    return out


SCENARIOS = _scenarios()


@pytest.fixture(scope="module")
def zygote() -> Any:
    proc = subprocess.Popen(
        [PYTHON, "-c", ZYGOTE_SOURCE, json.dumps(SAVE_OPTIONS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes (the zygote ignores SIGCHLD, so none stay)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][:1] != "Z"
    return True


def _events(log: str) -> list[list[str]]:
    with open(log) as f:
        return [line.rstrip("\n").split(" ", 3) for line in f if line.strip()]


def _wait(log: str, pids: list[int], cond: Any, timeout: float, what: str) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        events = _events(log)
        crashed = [e for e in events if e[1] == "crash"]
        assert not crashed, f"a rank crashed in the harness: {crashed}"
        if cond(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; log: {events}")
        time.sleep(0.005)


def _stacks(pids: list[int]) -> str:
    """The Python stacks of ``pids`` (py-spy, from the test extras), or why not."""
    import shutil
    import sys

    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        return "(py-spy not installed)"
    out = []
    for pid in pids:
        try:
            proc = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True,
                                  text=True, timeout=30)
            out.append(f"pid {pid}: {proc.stdout[-4000:] or proc.stderr[-1000:]}")
        except (OSError, subprocess.SubprocessError) as e:
            out.append(f"pid {pid}: {e}")
    return " | ".join(out)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "SIGKILLed ranks still alive"
        time.sleep(0.005)


def _check(path: str, allowed: set[int | None]) -> int | None:
    """The generation held at ``path`` (bit-exact), or None when nothing loads
    (and then load raised a ZarrCkptError)."""
    head: dict[str, Any] = {"gen": None}
    try:
        zarrckpt.load(head, path, strict=False)
    except ZarrCkptError:
        assert None in allowed, f"{path}: no loadable checkpoint, expected one of {allowed}"
        return None
    gen = head["gen"]
    assert gen in allowed, f"{path}: generation {gen}, expected one of {allowed}"
    expected = make_state(gen)
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
              for k, v in expected.items()}
    zarrckpt.load(target, path)
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, target[k], f"gen {gen} {k}")
    return gen


def _run(zygote: Any, base: str, n: int, sc: dict[str, Any]) -> dict[str, Any]:
    """Run scenario ``sc`` (number ``n``); return what was measured."""
    world_size, point = sc["world_size"], sc["point"]
    path = os.path.join(base, f"s{n}", "ckpt")
    os.makedirs(os.path.dirname(path))
    old_gen, new_gen = (2 * n + 1, 2 * n + 2) if sc["overwrite"] else (None, 2 * n + 2)
    if old_gen is not None:
        save_fast(make_state(old_gen), path, **{k: v for k, v in SAVE_OPTIONS.items()
                                                if k != "fsync"})
    log = path + ".log"
    open(log, "w").close()
    victims = sc["victims"]
    job = {
        **sc,
        "path": path,
        "gen": new_gen,
        "log": log,
        "rdzv": path + ".rdzv",
        "pause_ranks": victims,
    }
    zygote.stdin.write(json.dumps(job) + "\n")
    zygote.stdin.flush()
    pids: list[int] = json.loads(zygote.stdout.readline())
    try:
        if point == "random":
            _wait(log, pids, lambda ev: sum(e[1] == "saving" for e in ev) == world_size,
                  60, "every rank to start saving")
            time.sleep(sc["delay"])
        else:
            _wait(log, pids, lambda ev: {int(e[0]) for e in ev if e[1] == "paused"}
                  >= set(victims if point not in RANK0_POINTS else [0]),
                  60, f"the victims to reach {point}")
        before = {int(e[0]) for e in _events(log) if e[1] in ("done", "error")}
        _kill([pids[r] for r in victims])
        killed_at = time.monotonic()
        survivors = [r for r in range(world_size) if r not in victims and r not in before]
        try:
            _wait(log, pids,
                  lambda ev: {int(e[0]) for e in ev if e[1] in ("done", "error")}
                  >= set(survivors),
                  SURVIVOR_BOUND, f"surviving ranks {survivors} to raise")
        except AssertionError as e:  # where the survivors are stuck, for the report
            raise AssertionError(f"{e}; stacks: {_stacks([pids[r] for r in survivors])}") from None
        survivor_seconds = time.monotonic() - killed_at if survivors else 0.0
    finally:
        _kill(pids)
    events = _events(log)
    for e in events:
        if e[1] == "error":
            assert e[2] == "1", f"rank {e[0]} raised a non-zarrckpt error: {e[3]}"
    outcomes = {int(e[0]): e[1] for e in events if e[1] in ("done", "error")}
    if point != "random":  # a named point: no rank of the group finished the save
        assert all(o == "error" for o in outcomes.values()), events
    # what the path holds
    if point == "precommit" and 0 not in victims:
        # rank 0 commits (every rank's data was agreed written) before it learns
        # that a rank died on its way into the commit step: the new checkpoint is whole
        allowed: set[int | None] = {new_gen}
    elif point in ("entry", "chunk", "precommit", "marker", "rename"):
        allowed = {old_gen}
    elif point == "cleanup":
        allowed = {new_gen}
    else:
        allowed = {old_gen, new_gen}
    gen = _check(path, allowed)
    # a later save to the path succeeds and loads bit-exact
    save_fast(make_state(0), path, overwrite=True)
    assert _check(path, {0}) == 0
    return {"gen": gen, "survivor_seconds": survivor_seconds, "outcomes": outcomes}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_crash_matrix(zygote: Any, tmp_path: Any, world_size: int) -> None:
    """Every scenario of :data:`SCENARIOS` for this world size (one SIGKILL event
    each, killing one rank or all of them)."""
    mine = [sc for sc in SCENARIOS if sc["world_size"] == world_size]
    slowest = 0.0
    kills = 0
    held: dict[str, int] = {}
    for n, sc in enumerate(mine):
        try:
            try:
                out = _run(zygote, str(tmp_path), n, sc)
            except AssertionError as e:
                # a gloo group that failed to form (connectFullMesh under heavy load)
                # is the harness's problem, not the save's: run the scenario again once
                if "init_process_group" not in str(e):
                    raise
                out = _run(zygote, str(tmp_path), n + 10_000, sc)
        except AssertionError as e:
            raise AssertionError(f"scenario {sc}: {e}") from None
        slowest = max(slowest, out["survivor_seconds"])
        kills += len(sc["victims"])
        key = "none" if out["gen"] is None else ("new" if out["gen"] % 2 == 0 else "old")
        held[key] = held.get(key, 0) + 1
    print(f"\n{world_size} ranks: {len(mine)} scenarios, {kills} ranks killed, "
          f"path held {held}, slowest survivor {slowest:.2f}s")
    assert len(mine) == 34
