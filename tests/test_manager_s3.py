"""CheckpointManager on an S3 server (moto on 127.0.0.1): saves every step with
retention (sync and async), the commit marker deleted before a dropped step's
other objects, incomplete steps (a save SIGKILLed before its marker), restore of
the newest complete step bit-exact, ``storage_options`` used for every request,
and ``zarrckpt ls`` / ``zarrckpt gc`` on an ``s3://`` root.

Written from the outside: objects are found by listing the bucket, never by
their names inside a step checkpoint (only the commit marker's key is known).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from conftest import DTYPES, assert_bits_equal, random_tensor

import zarrckpt
from zarrckpt.cli import main as cli_main
from zarrckpt.errors import IncompleteCheckpointError
from zarrckpt.format._marker import COMMIT_MARKER
from zarrckpt.storage import _local
from zarrckpt.storage._object import ObjectStore


def _state(step: int) -> dict[str, Any]:
    sd: dict[str, Any] = {
        f"t.{i}": random_tensor(d, (23, 7), seed=100 * step + i) for i, d in enumerate(DTYPES)
    }
    sd["big"] = random_tensor(torch.float32, (70_000,), seed=step)
    sd["step"] = step
    return sd


def _zeros() -> dict[str, Any]:
    out: dict[str, Any] = {k: torch.zeros_like(v) for k, v in _state(0).items()
                           if isinstance(v, torch.Tensor)}
    out["step"] = -1
    return out


def _assert_state(out: dict[str, Any], step: int) -> None:
    expected = _state(step)
    assert out["step"] == step
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, out[k], k)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ``storage_options`` of every object store opened during the test; opening
    one without them (endpoint and credentials from the environment) fails at once."""
    seen: list[Any] = []

    def record(store: Any) -> Any:
        if isinstance(store, ObjectStore):
            assert store.storage_options is not None, f"{store.path!r} opened without options"
            seen.append(store.storage_options)
        return store

    monkeypatch.setattr(_local, "STORE_WRAPPERS", [*_local.STORE_WRAPPERS, record])
    return seen


def _tops(s3_server: Any, url: str) -> list[str]:
    return ObjectStore(url, s3_server.options()).list_dir()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_every_step_keep_last_2_and_restore(s3_server, s3_url, opened, async_save):
    opts = s3_server.options()
    with zarrckpt.CheckpointManager(s3_url, keep_last=2, async_save=async_save,
                                    storage_options=opts) as manager:
        assert manager.latest_step() is None and manager.all_steps() == []
        for step in range(5):
            assert manager.save(step, _state(step), metrics={"loss": 1.0 / (step + 1)})
    assert manager.all_steps() == [3, 4] and manager.latest_step() == 4
    assert manager.incomplete_steps() == []
    assert _tops(s3_server, s3_url) == ["step_00000003", "step_00000004"]
    assert manager.metrics(3) == {"loss": 0.25}
    out = _zeros()
    assert manager.restore(out) == 4
    _assert_state(out, 4)
    assert manager.restore(out, step=3) == 3
    _assert_state(out, 3)
    # a step checkpoint is a normal checkpoint at the URL the manager reports
    assert manager.step_path(4) == f"{s3_url}/step_00000004"
    assert zarrckpt.open(manager.step_path(4), storage_options=opts).metadata["manager"] == {
        "step": 4, "metrics": {"loss": 0.2}
    }
    # every request of the manager (save, load, listing, removal) used the options given
    assert opened and all(o == opts for o in opened), opened


def test_retention_deletes_the_commit_marker_first(s3_server, s3_url, monkeypatch):
    opts = s3_server.options()
    manager = zarrckpt.CheckpointManager(s3_url, keep_last=1, storage_options=opts)
    manager.save(0, _state(0))
    step0 = ObjectStore(f"{s3_url}/step_00000000", opts).object_keys()
    assert COMMIT_MARKER in step0 and len(step0) > 3
    deleted: list[list[str]] = []
    real = ObjectStore._delete

    def record(self: ObjectStore, keys: list[str]) -> None:
        deleted.append([self.full_key(k) for k in keys])
        real(self, keys)

    monkeypatch.setattr(ObjectStore, "_delete", record)
    manager.save(1, _state(1))
    prefix = ObjectStore(f"{s3_url}/step_00000000", opts).full_key("")
    batches = [[k for k in b if k.startswith(prefix + "/")] for b in deleted]
    batches = [b for b in batches if b]
    assert batches[0] == [f"{prefix}/{COMMIT_MARKER}"], batches  # alone, before the rest
    assert sorted(k for b in batches for k in b) == sorted(f"{prefix}/{k}" for k in step0)
    assert manager.all_steps() == [1] and _tops(s3_server, s3_url) == ["step_00000001"]


def test_retention_cut_short_leaves_an_incomplete_step(s3_server, s3_url, monkeypatch):
    opts = s3_server.options()
    manager = zarrckpt.CheckpointManager(s3_url, keep_last=1, storage_options=opts)
    manager.save(0, _state(0))
    real = ObjectStore._delete
    step0 = ObjectStore(manager.step_path(0), opts).full_key("") + "/"
    calls: list[list[str]] = []

    def die_after_the_marker(self: ObjectStore, keys: list[str]) -> None:
        if any(self.full_key(k).startswith(step0) for k in keys):
            calls.append(keys)
            if len(calls) == 2:  # step 0's marker is gone, the rest is not
                raise KeyboardInterrupt("killed while deleting")
        real(self, keys)

    monkeypatch.setattr(ObjectStore, "_delete", die_after_the_marker)
    with pytest.raises(KeyboardInterrupt):
        manager.save(1, _state(1))
    monkeypatch.setattr(ObjectStore, "_delete", real)
    assert manager.all_steps() == [1] and manager.incomplete_steps() == [0]
    with pytest.raises(IncompleteCheckpointError, match="step 0 .* is incomplete"):
        manager.restore(_zeros(), step=0)
    manager.save(2, _state(2))  # removes the incomplete step, then retention drops 1
    assert manager.all_steps() == [2] and manager.incomplete_steps() == []
    assert _tops(s3_server, s3_url) == ["step_00000002"]


_KILLED_STEP = """
import json, os, signal, sys, torch, zarrckpt
from zarrckpt.storage import _object
from zarrckpt.format._marker import COMMIT_MARKER
sys.path.insert(0, sys.argv[3])
from test_manager_s3 import _state
url, opts = sys.argv[1], json.loads(sys.argv[2])
manager = zarrckpt.CheckpointManager(url, keep_last=2, storage_options=opts)
for step in range(3):
    manager.save(step, _state(step), metrics={"loss": float(step)})
real_put = _object.ObjectStaging._put
def put(self, key, data, **kw):
    if key == COMMIT_MARKER:  # killed after every data object and the root, before the marker
        os.kill(os.getpid(), signal.SIGKILL)
    return real_put(self, key, data, **kw)
_object.ObjectStaging._put = put
manager.save(3, _state(3))
"""


def test_killed_save_is_incomplete_listed_and_collected(s3_server, s3_url, monkeypatch,
                                                         capsys):
    opts = s3_server.options()
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_STEP, s3_url, json.dumps(opts),
         os.path.dirname(__file__)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **s3_server.env},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    manager = zarrckpt.CheckpointManager(s3_url, keep_last=2, storage_options=opts)
    assert manager.all_steps() == [1, 2] and manager.latest_step() == 2
    assert manager.incomplete_steps() == [3]
    assert len(ObjectStore(manager.step_path(3), opts).object_keys()) > 3  # its objects
    out = _zeros()
    assert manager.restore(out) == 2  # the newest complete step, never the killed one
    _assert_state(out, 2)

    # the command line, endpoint and credentials from the environment
    env = {**os.environ, **s3_server.env}
    listed = subprocess.run(
        [sys.executable, "-m", "zarrckpt", "ls", "--json", s3_url],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = json.loads(listed.stdout)["steps"]
    assert [(r["step"], r["state"]) for r in rows] == [
        (1, "committed"), (2, "committed"), (3, "incomplete")
    ]
    assert rows[0]["metrics"] == {"loss": 1.0} and rows[0]["created"]
    assert all(r["bytes"] > 0 for r in rows)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert cli_main(["gc", "--dry-run", "--json", s3_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and [(r["step"], r["entry"]) for r in report["removed"]] == [
        (3, "step_00000003")
    ]
    assert report["removed"][0]["bytes"] == rows[2]["bytes"]
    assert manager.incomplete_steps() == [3]  # a dry run removes nothing
    assert cli_main(["gc", s3_url]) == 0
    assert "removed 1 incomplete entries" in capsys.readouterr().out
    assert manager.incomplete_steps() == [] and manager.all_steps() == [1, 2]
    assert _tops(s3_server, s3_url) == ["step_00000001", "step_00000002"]


def test_an_incomplete_step_is_replaced_by_the_next_save(s3_server, s3_url):
    """Objects of a step without commit marker (written directly, no save at all)."""
    import obstore

    opts = s3_server.options()
    manager = zarrckpt.CheckpointManager(s3_url, keep_last=None, storage_options=opts)
    manager.save(1, _state(1))
    stray = ObjectStore(manager.step_path(5), opts)
    obstore.put(stray.client, stray.full_key("zarr.json"), b"{}")
    obstore.put(stray.client, stray.full_key("w/c/0"), b"\0" * 16)
    assert manager.all_steps() == [1] and manager.incomplete_steps() == [5]
    assert manager.save(5, _state(5))
    assert manager.all_steps() == [1, 5] and manager.incomplete_steps() == []
    assert "w" not in ObjectStore(manager.step_path(5), opts).list_dir()
    out = _zeros()
    assert manager.restore(out) == 5
    _assert_state(out, 5)


@pytest.mark.slow
def test_two_ranks_save_retain_and_restore(s3_server, s3_url):
    import _manager_cases as cases

    from zarrckpt.testing import run_distributed

    opts = s3_server.options()
    results = run_distributed(cases.s3_two_ranks, 2, s3_url, opts)
    assert results == [([3, 4], [], 4, True)] * 2
    assert _tops(s3_server, s3_url) == ["step_00000003", "step_00000004"]
    # one process restores what two saved, bit-exact
    manager = zarrckpt.CheckpointManager(s3_url, storage_options=opts)
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1
              for k, v in cases.s3_state(0).items()}
    assert manager.restore(target, step=3) == 3
    for k, v in cases.s3_state(3).items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, target[k], k)
        else:
            assert target[k] == v
    assert manager.metrics(4) == {"rank_count": 2}
