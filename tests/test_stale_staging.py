"""Stale staging cleanup: the next save removes a dead save's staging, never a live one's.

A save's staging directory ``.<name>.zarrckpt-tmp-<id>`` has an owner record
``<staging>.owner`` (zarrckpt/storage/_liveness.py): locked with ``flock`` by
the saving process and holding its host, pid and process start time. The
next save to the path removes the stagings whose owner is provably dead. Here:
the record rules one by one, a staging left by a SIGKILLed save (removed by
the next save), and two savers in separate processes writing the same path at
once with ``overwrite=True`` (both complete, the path holds one of them whole).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import _faults
import pytest
import torch

import zarrckpt
from zarrckpt.errors import StorageError
from zarrckpt.storage import _liveness
from zarrckpt.storage._local import LocalStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entries(path: str) -> list[str]:
    """Stagings and owner records of saves to ``path``."""
    parent, name = os.path.split(os.path.abspath(path))
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def fake_staging(path: str, record: Any, *, age: float = 0.0, suffix: str = "0") -> str:
    """A staging of ``path`` with the owner record ``record`` (None: without one),
    both last modified ``age`` seconds ago."""
    parent, name = os.path.split(os.path.abspath(path))
    staging = os.path.join(parent, f".{name}.zarrckpt-tmp-{suffix * 12}")
    os.mkdir(staging)
    with open(os.path.join(staging, "junk"), "wb") as f:
        f.write(b"x" * 100)
    stamp = time.time() - age
    if record is not None:
        owner = staging + _liveness.OWNER_SUFFIX
        with open(owner, "w") as f:
            f.write(record if isinstance(record, str) else json.dumps(record))
        os.utime(owner, (stamp, stamp))
    os.utime(staging, (stamp, stamp))
    return staging


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


ME = {"host": socket.gethostname(), "pid": os.getpid(), "start": _liveness._start_time(os.getpid())}
OLD = _liveness.STALE_SECONDS + 60


@pytest.mark.parametrize(
    "record,age,stale",
    [
        pytest.param({**ME, "pid": dead_pid()}, 0, True, id="same-host-dead-pid"),
        pytest.param({**ME, "start": "1"}, 0, True, id="same-host-reused-pid"),
        pytest.param(ME, 0, False, id="same-host-live-unlocked"),
        pytest.param(ME, OLD, False, id="same-host-live-old"),
        pytest.param({**ME, "host": "elsewhere"}, 0, False, id="other-host-fresh"),
        pytest.param({**ME, "host": "elsewhere"}, OLD, True, id="other-host-old"),
        pytest.param(None, 0, False, id="no-record-fresh"),
        pytest.param(None, OLD, True, id="no-record-old"),
        pytest.param("", 0, False, id="empty-record-fresh"),
        pytest.param("", 120, True, id="empty-record-old"),
    ],
)
def test_owner_record_rules(tmp_path: Any, record: Any, age: float, stale: bool) -> None:
    """Only a provably dead owner's staging is listed by Store.stale_stagings and
    removed by the next save; a live one's stays untouched."""
    path = str(tmp_path / "ckpt")
    staging = fake_staging(path, record, age=age)
    store = LocalStore(path)
    assert store.stale_stagings() == ([staging] if stale else [])
    zarrckpt.save({"x": torch.ones(3)}, path)
    assert os.path.isdir(staging) is not stale
    if stale:
        assert entries(path) == []
    else:
        assert os.listdir(staging) == ["junk"]


def test_locked_record_is_live(tmp_path: Any) -> None:
    """A record locked by another process is live even if its pid looks dead."""
    import fcntl

    path = str(tmp_path / "ckpt")
    staging = fake_staging(path, {**ME, "pid": dead_pid()})
    fd = os.open(staging + _liveness.OWNER_SUFFIX, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description than the check's
        assert LocalStore(path).stale_stagings() == []
    finally:
        os.close(fd)
    assert LocalStore(path).stale_stagings() == [staging]


def test_saves_leave_no_records(tmp_path: Any) -> None:
    """A committed and a failed save remove their record with their staging."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"x": torch.ones(3)}, path)
    with _faults.inject("write", "EIO", 2), pytest.raises(StorageError):
        zarrckpt.save({"x": torch.ones(3)}, path, overwrite=True)
    assert entries(path) == []


# --------------------------------------------------------------------------- other processes

#: a child that saves to argv[1] and stops in its first chunk write: it creates
#: argv[2] there, then waits until argv[3] exists (or forever)
_PAUSING_SAVER = textwrap.dedent(
    """
    import os, sys, time
    import torch, zarrckpt
    from zarrckpt.storage import _posix
    path, ready, go = sys.argv[1:4]
    original = _posix.write_file
    def paused(*args, **kwargs):
        if not os.path.exists(ready):
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.02)
        return original(*args, **kwargs)
    _posix.write_file = paused
    zarrckpt.save({"x": torch.full((1000,), 7.0), "who": "child"}, path, overwrite=True)
    """
)


def _start_saver(tmp_path: Any, path: str) -> tuple[subprocess.Popen[bytes], str, str]:
    ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSING_SAVER, path, ready, go],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise AssertionError(f"saver exited early: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("saver never reached its first chunk write")
        time.sleep(0.02)
    return proc, ready, go


def test_sigkilled_save_staging_removed_by_next_save(tmp_path: Any) -> None:
    """A save SIGKILLed mid-write leaves its staging; the next save to the path removes it."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"x": torch.zeros(1000), "who": "first"}, path)
    proc, _ready, _go = _start_saver(tmp_path, path)
    left = entries(path)
    assert len(left) == 2, left  # the staging and its owner record
    assert LocalStore(path).stale_stagings() == []  # alive: not stale
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert entries(path) == left  # the dead save's staging is still there
    assert LocalStore(path).stale_stagings() == [os.path.join(str(tmp_path), left[0])]
    zarrckpt.save({"x": torch.ones(1000), "who": "next"}, path, overwrite=True)
    assert entries(path) == []
    target = {"x": torch.empty(1000), "who": None}
    zarrckpt.load(target, path)
    assert torch.equal(target["x"], torch.ones(1000)) and target["who"] == "next"


def test_concurrent_savers_keep_each_others_staging(tmp_path: Any) -> None:
    """Two savers to one path at once (overwrite=True, separate processes): the one
    starting second never removes the first one's staging; both complete and the path
    holds the last published one whole."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"x": torch.zeros(1000), "who": "first"}, path)
    proc, _ready, go = _start_saver(tmp_path, path)
    try:
        theirs = entries(path)
        # this process saves while the child's save is in progress
        zarrckpt.save({"x": torch.ones(1000), "who": "parent"}, path, overwrite=True)
        assert entries(path) == theirs, "the live save's staging was touched"
        target = {"x": torch.empty(1000), "who": None}
        zarrckpt.load(target, path)
        assert torch.equal(target["x"], torch.ones(1000)) and target["who"] == "parent"
    finally:
        open(go, "w").close()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert entries(path) == []
    target = {"x": torch.empty(1000), "who": None}
    zarrckpt.load(target, path)
    assert torch.equal(target["x"], torch.full((1000,), 7.0)) and target["who"] == "child"
