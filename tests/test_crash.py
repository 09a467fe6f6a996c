"""Commit protocol: a checkpoint is visible only once complete, saves never damage
the previous one, and a save killed at any moment leaves the old or the new
checkpoint (never a half one that loads, never an error other than "nothing here").

* crash tests: a subprocess saves ~200 MB (with fsync) and is SIGKILLed at
  several delays after it announced the start of the save, and at three exact
  points of the commit (paused by patching zarrckpt.storage._posix in the child);
* failed saves (unsupported leaf, exception injected into
  ``zarrckpt.storage._posix.write_file`` after N calls, failing commit marker):
  previous checkpoint intact, no staging directory left;
* overwrite=False / overwrite=True semantics.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from typing import Any

import pytest
import torch
from conftest import PYTHON, assert_bits_equal, save_fast

import zarrckpt
import zarrckpt.storage._posix
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from zarrckpt.format._marker import COMMIT_MARKER

STAGING_INFIX = ".zarrckpt-tmp-"

#: the state dicts of the crash tests, shared by the parent and the child
STATE_SOURCE = r'''
import torch

def make_state(gen, mb):
    """Deterministic state of generation ``gen``, about ``mb`` MiB."""
    n = (mb << 20) // 16
    sd = {"generation": gen, "meta": {"mb": mb, "name": "gen-%d" % gen}}
    for i in range(4):
        t = torch.arange(n, dtype=torch.int32).mul_(2 * gen + 1).add_(7919 * i)
        sd["layer%d.weight" % i] = t.view(-1, 1024)
    sd["small"] = torch.full((3,), float(gen), dtype=torch.bfloat16)
    sd["scalar"] = torch.tensor(gen * 1.5, dtype=torch.float64)
    return sd
'''

_ns: dict[str, Any] = {}
exec(STATE_SOURCE, _ns)
make_state = functools.lru_cache(maxsize=4)(_ns["make_state"])  # read-only use below

#: A "zygote" imports torch and zarrckpt once (several seconds on a busy 2-core
#: machine), then forks one saver per scenario: each saver is a real process,
#: SIGKILLed by pid. Savers report progress lines ("saving", "paused", "done")
#: in a log file.
ZYGOTE_SOURCE = (
    STATE_SOURCE
    + r"""
import os, signal, sys, time, traceback
import torch
import zarrckpt
import zarrckpt.storage._posix as storage


def run(path, gen, mb, pause, log):
    torch.set_num_threads(1)
    state = make_state(gen, mb)
    logf = open(log, "a", buffering=1)

    def hang(*args, **kwargs):
        logf.write("paused\n")
        time.sleep(600)

    if pause == "marker":  # everything written and synced, commit marker not yet written
        write_json = storage.write_json

        def patched_write_json(p, *a, **k):
            if p.endswith(storage.COMMIT_MARKER):
                hang()
            return write_json(p, *a, **k)

        storage.write_json = patched_write_json
    elif pause == "publish":  # committed inside the staging directory, not yet renamed
        storage._renameat2 = hang
    elif pause == "cleanup":  # renamed into place, the previous one not yet deleted
        storage.remove_tree = hang
    logf.write("saving\n")
    zarrckpt.save(state, path, overwrite=True, fsync=True)
    logf.write("done\n")


signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # savers are reaped automatically
print("ready", flush=True)
for line in sys.stdin:
    path, gen, mb, pause, log = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        code = 0
        try:
            run(path, int(gen), int(mb), pause, log)
        except BaseException:
            with open(log, "a") as f:
                f.write("error " + traceback.format_exc().replace("\n", " | ") + "\n")
            code = 1
        os._exit(code)
    print(pid, flush=True)
"""
)

NEW_MB = 200
OLD_MB = 8


@pytest.fixture(scope="module")
def zygote() -> Any:
    proc = subprocess.Popen(
        [PYTHON, "-c", ZYGOTE_SOURCE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(log: str, words: tuple[str, ...], pid: int, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log) as f:
            text = f.read()
        if "error" in text:
            raise AssertionError(f"saver failed: {text}")
        if any(w in text.split() for w in words):
            return text
        if not _alive(pid):
            with open(log) as f:
                raise AssertionError(f"saver died before {words}: {f.read()!r}")
        time.sleep(0.002)
    raise AssertionError(f"saver never reached {words}")


def run_child_and_kill(zygote: Any, path: str, gen: int, when: str | float) -> bool:
    """Fork a saver writing generation ``gen`` at ``path``; SIGKILL it ``when``
    seconds after it logged "saving" (or once it reached the pause point
    ``when``; "complete": let it finish). Return True if the save finished."""
    pause = when if isinstance(when, str) and when != "complete" else "none"
    log = path + ".log"
    open(log, "w").close()
    zygote.stdin.write("\t".join([path, str(gen), str(NEW_MB), pause, log]) + "\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    try:
        _wait_for(log, ("saving",), pid)
        if when == "complete":
            _wait_for(log, ("done",), pid)
        elif isinstance(when, str):
            _wait_for(log, ("paused",), pid)
        else:
            time.sleep(when)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.005)
    assert not _alive(pid)
    with open(log) as f:
        text = f.read()
    os.remove(log)
    assert "error" not in text, text
    return "done" in text.split()


def check_checkpoint(path: str, allowed: set[int]) -> int:
    """The path holds a complete checkpoint of one of the ``allowed`` generations,
    bit-exact; return its generation."""
    head: dict[str, Any] = {"generation": None, "meta": None}
    zarrckpt.load(head, path)
    gen, mb = head["generation"], head["meta"]["mb"]
    assert gen in allowed, f"generation {gen} at {path}, expected one of {allowed}"
    expected = make_state(gen, mb)
    target = {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in expected.items()
    }
    zarrckpt.load(target, path)
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, target[k], f"gen {gen} {k}")
        else:
            assert target[k] == v, k
    assert_bits_equal(expected["small"], zarrckpt.open(path).read("small"))
    return gen


def leftovers(parent: Any, name: str) -> list[str]:
    """Entries of ``parent`` other than the checkpoint ``name`` itself."""
    return sorted(e for e in os.listdir(parent) if e != name)


CRASH_POINTS: list[str | float] = [0.0, 0.05, 0.1, 0.2, 0.4, "marker", "publish", "cleanup"]


@pytest.mark.slow
@pytest.mark.parametrize("when", CRASH_POINTS, ids=[str(w) for w in CRASH_POINTS])
def test_killed_overwrite_leaves_old_or_new(zygote: Any, tmp_path: Any, when: str | float) -> None:
    path = str(tmp_path / "ckpt")
    save_fast(make_state(0, OLD_MB), path)
    finished = run_child_and_kill(zygote, path, 1, when)
    gen = check_checkpoint(path, {0, 1})
    if finished:
        assert gen == 1
    if when in ("marker", "publish"):
        assert gen == 0, "killed before the rename: the previous checkpoint must be in place"
    if when == "cleanup":
        assert gen == 1, "killed after the rename: the new checkpoint must be in place"
    # whatever was left behind is a hidden staging directory, nothing else
    assert all(e.startswith("." + "ckpt" + STAGING_INFIX) for e in leftovers(tmp_path, "ckpt"))
    # and the next save works
    save_fast(make_state(2, OLD_MB), path, overwrite=True)
    assert check_checkpoint(path, {2}) == 2


FRESH_POINTS: list[str | float] = [0.05, 0.3, "publish", "complete"]


@pytest.mark.slow
@pytest.mark.parametrize("when", FRESH_POINTS, ids=[str(w) for w in FRESH_POINTS])
def test_killed_fresh_save_leaves_nothing_or_new(
    zygote: Any, tmp_path: Any, when: str | float
) -> None:
    path = str(tmp_path / "ckpt")
    finished = run_child_and_kill(zygote, path, 5, when)
    if finished or when == "complete":
        assert check_checkpoint(path, {5}) == 5
        return
    try:
        gen = check_checkpoint(path, {5})
    except CheckpointNotFoundError as e:
        assert path in str(e)
        assert not os.path.exists(path)
        gen = None
    if when == "publish":
        assert gen is None
    assert all(e.startswith(".ckpt" + STAGING_INFIX) for e in leftovers(tmp_path, "ckpt"))


# ----------------------------------------------------------------- visibility during a save


def _snapshot(root: Any) -> dict[str, tuple[int, int, int]]:
    """Every file below ``root``: (size, mtime_ns, inode)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def test_not_visible_until_committed(tmp_path: Any, monkeypatch: Any) -> None:
    """While chunks are being written, open/load see the previous checkpoint (or none)."""
    path = str(tmp_path / "ckpt")
    save_fast({"x": torch.zeros(4), "v": 0}, path)
    old_id = zarrckpt.open(path).metadata["checkpoint_id"]
    fresh = str(tmp_path / "fresh")
    phase = {"target": fresh, "calls": 0}
    original = zarrckpt.storage._posix.write_file

    def spying_write_file(*args: Any, **kwargs: Any) -> int:
        if phase["target"] == fresh:
            with pytest.raises(CheckpointNotFoundError):
                zarrckpt.open(fresh)
            with pytest.raises(CheckpointNotFoundError):
                zarrckpt.load({"v": None}, fresh)
        assert zarrckpt.open(path).metadata["checkpoint_id"] == old_id
        target = {"x": torch.empty(4), "v": None}
        zarrckpt.load(target, path)
        assert target["v"] == 0
        phase["calls"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(zarrckpt.storage._posix, "write_file", spying_write_file)
    new = {"x": torch.ones(4), "v": 1, "y": torch.randn(100, 100)}
    zarrckpt.save(new, fresh, chunk_bytes=4000, fsync=False, threads=1)
    assert phase["calls"] > 10
    phase["target"] = path
    zarrckpt.save(new, path, overwrite=True, chunk_bytes=4000, fsync=False, threads=1)
    assert phase["calls"] > 20
    monkeypatch.undo()
    for p in (fresh, path):
        target = {"x": torch.empty(4), "v": None, "y": torch.empty(100, 100)}
        zarrckpt.load(target, p)
        assert target["v"] == 1
        assert_bits_equal(new["y"], target["y"])


# ----------------------------------------------------------------- overwrite semantics


def test_overwrite_false_refuses_and_touches_nothing(tmp_path: Any) -> None:
    path = tmp_path / "ckpt"
    save_fast({"x": torch.arange(5)}, path)
    before = _snapshot(path)
    with pytest.raises(CheckpointExistsError) as info:
        zarrckpt.save({"x": torch.zeros(5, dtype=torch.int64)}, path)
    assert str(path) in str(info.value)
    assert _snapshot(path) == before
    assert leftovers(tmp_path, "ckpt") == []
    target = {"x": torch.zeros(5, dtype=torch.int64)}
    zarrckpt.load(target, path)
    assert torch.equal(target["x"], torch.arange(5))


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_overwrite_false_on_other_things(tmp_path: Any, kind: str) -> None:
    path = tmp_path / "thing"
    if kind == "file":
        path.write_bytes(b"precious")
    else:
        path.mkdir()
        (path / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointExistsError):
        zarrckpt.save({"x": torch.zeros(1)}, path)
    if kind == "file":
        assert path.read_bytes() == b"precious"
    else:
        assert (path / "precious.txt").read_text() == "keep me"
        # overwrite=True does not delete an unrelated directory either
        with pytest.raises(CheckpointExistsError):
            zarrckpt.save({"x": torch.zeros(1)}, path, overwrite=True)
        assert (path / "precious.txt").read_text() == "keep me"
    assert leftovers(tmp_path, "thing") == []


def test_overwrite_true_replaces(tmp_path: Any) -> None:
    path = tmp_path / "ckpt"
    save_fast({"x": torch.arange(5), "old_only": torch.ones(3), "v": "old"}, path)
    old_id = zarrckpt.open(path).metadata["checkpoint_id"]
    zarrckpt.save({"x": torch.arange(7), "v": "new"}, path, overwrite=True)
    ckpt = zarrckpt.open(path)
    assert ckpt.metadata["checkpoint_id"] != old_id
    assert set(ckpt.keys()) == {"x"}
    assert torch.equal(ckpt.read("x"), torch.arange(7))
    assert not os.path.exists(path / "old_only")
    assert leftovers(tmp_path, "ckpt") == []


# ----------------------------------------------------------------- failed saves


class _Boom(RuntimeError):
    pass


def _old_state() -> dict[str, Any]:
    return {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "step": 1}


def _assert_old_intact(tmp_path: Any, path: Any, before: dict[str, Any]) -> None:
    assert _snapshot(path) == before
    target = {"w": torch.zeros(3, 4), "step": None}
    zarrckpt.load(target, path)
    assert_bits_equal(_old_state()["w"], target["w"])
    assert target["step"] == 1
    assert leftovers(tmp_path, "ckpt") == [], "a staging directory was left behind"


def _new_state() -> dict[str, Any]:
    return {
        "w": torch.randn(3, 4),
        "big": torch.randn(300, 100),
        "more": [torch.randn(50, 10) for _ in range(5)],
        "step": 2,
    }


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize(
    "make_leaf,error",
    [
        (object, UnsafeCheckpointError),
        (lambda: torch.zeros(3).to_sparse(), UnsupportedValueError),
        (
            lambda: torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8),
            UnsupportedValueError,
        ),
        (lambda: torch.zeros(3, device="meta"), UnsupportedValueError),
        (lambda: torch.zeros(3, dtype=torch.float8_e4m3fnuz), UnsupportedValueError),
    ],
    ids=["object", "sparse", "quint8", "meta", "float8_e4m3fnuz"],
)
def test_unsupported_leaf_leaves_previous_intact(
    tmp_path: Any, make_leaf: Any, error: type[Exception], overwrite: bool
) -> None:
    leaf = make_leaf()
    path = tmp_path / "ckpt"
    save_fast(_old_state(), path)
    before = _snapshot(path)
    state = _new_state()
    state["zz_last"] = {"deep": [1, leaf]}  # discovered after every other leaf
    with pytest.raises((error, CheckpointExistsError)) as info:
        zarrckpt.save(state, path, overwrite=overwrite, chunk_bytes=2000)
    if not overwrite and info.type is CheckpointExistsError:
        pass  # refusing early is fine too
    else:
        assert "zz_last.deep.1" in str(info.value)
    _assert_old_intact(tmp_path, path, before)


@pytest.mark.parametrize("after_calls", [0, 1, 7, 30])
@pytest.mark.parametrize("threads", [1, 4])
def test_exception_mid_write_leaves_previous_intact(
    tmp_path: Any, monkeypatch: Any, after_calls: int, threads: int
) -> None:
    path = tmp_path / "ckpt"
    save_fast(_old_state(), path)
    before = _snapshot(path)
    calls = []
    original = zarrckpt.storage._posix.write_file

    def failing_write_file(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) > after_calls:
            raise _Boom(f"injected failure after {after_calls} chunk writes")
        return original(*args, **kwargs)

    monkeypatch.setattr(zarrckpt.storage._posix, "write_file", failing_write_file)
    with pytest.raises(_Boom):
        zarrckpt.save(_new_state(), path, overwrite=True, chunk_bytes=2000, threads=threads)
    assert len(calls) > after_calls, "the injected write_file was not used by save"
    _assert_old_intact(tmp_path, path, before)
    monkeypatch.undo()
    # a fresh path: nothing is left at all
    monkeypatch.setattr(zarrckpt.storage._posix, "write_file", failing_write_file)
    calls.clear()
    fresh = tmp_path / "fresh"
    with pytest.raises(_Boom):
        zarrckpt.save(_new_state(), fresh, chunk_bytes=2000, threads=threads)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_keyboard_interrupt_mid_write(tmp_path: Any, monkeypatch: Any) -> None:
    path = tmp_path / "ckpt"
    save_fast(_old_state(), path)
    before = _snapshot(path)
    calls = []
    original = zarrckpt.storage._posix.write_file

    def interrupted(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(zarrckpt.storage._posix, "write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zarrckpt.save(_new_state(), path, overwrite=True, chunk_bytes=2000, threads=1)
    _assert_old_intact(tmp_path, path, before)


@pytest.mark.parametrize("fsync", [True, False])
def test_failing_commit_marker_leaves_previous_intact(
    tmp_path: Any, monkeypatch: Any, fsync: bool
) -> None:
    path = tmp_path / "ckpt"
    save_fast(_old_state(), path)
    before = _snapshot(path)
    original = zarrckpt.storage._posix.write_json

    def failing_write_json(p: str, *args: Any, **kwargs: Any) -> bytes:
        if p.endswith(COMMIT_MARKER):
            raise OSError(28, "No space left on device (injected)")
        return original(p, *args, **kwargs)

    monkeypatch.setattr(zarrckpt.storage._posix, "write_json", failing_write_json)
    with pytest.raises(OSError, match="injected"):
        zarrckpt.save(_new_state(), path, overwrite=True, fsync=fsync)
    _assert_old_intact(tmp_path, path, before)
