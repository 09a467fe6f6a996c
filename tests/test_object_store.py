"""Checkpoints on an S3 server (moto on 127.0.0.1): round trips, open, async_save,
the commit protocol (a save that dies before its marker is invisible, its
leftovers listed and removed by the next save), overwrite, and path checks.

Written from the outside: objects are found by listing the bucket, never by
their names inside an array, so the tests hold whatever the chunk layout is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DTYPES, assert_bits_equal, random_tensor

import zarrckpt
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    InvalidPathError,
)
from zarrckpt.storage._object import ObjectStore


def _state() -> dict:
    sd = {f"t.{i}": random_tensor(d, (37, 5), seed=i) for i, d in enumerate(DTYPES)}
    sd["big"] = random_tensor(torch.float32, (600_000,), seed=99)  # several chunks
    sd["empty"] = torch.zeros(0, 3)
    sd["meta"] = {"step": 7, "name": "run", "lr": 0.5}
    return sd


def _zeros_like(sd: dict) -> dict:
    out = {k: torch.zeros_like(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    out["meta"] = {"step": 0, "name": "", "lr": 0.0}
    return out


def test_round_trip_every_dtype(s3_server, s3_url):
    sd = _state()
    zarrckpt.save(sd, s3_url, storage_options=s3_server.options(), chunk_bytes=1 << 20)
    out = _zeros_like(sd)
    zarrckpt.load(out, s3_url, storage_options=s3_server.options())
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, out[k], k)
    assert out["meta"] == sd["meta"]
    store = ObjectStore(s3_url, s3_server.options())
    assert store.leftovers() == []  # nothing but the checkpoint's own objects
    assert not store.shared_files


def test_open_stats_verify_and_plain_zarr_view(s3_server, s3_url):
    sd = {"w": torch.randn(64, 33).bfloat16(), "b": torch.arange(10)}
    zarrckpt.save(sd, s3_url, storage_options=s3_server.options())
    ck = zarrckpt.open(s3_url, storage_options=s3_server.options())
    assert sorted(ck) == ["b", "w"]
    assert_bits_equal(sd["w"], ck.read("w"))
    stats = ck.stats()
    assert stats["b"].max == 9 and stats["b"].zeros == 1
    assert_bits_equal(sd["b"], torch.from_numpy(ck.to_dask()["b"].compute()))
    assert_bits_equal(sd["b"], torch.from_numpy(ck["b"][...]))  # zarr.Array on the store
    report = ck.verify()
    assert report.ok, report


def test_async_save(s3_server, s3_url):
    sd = {"x": random_tensor(torch.float16, (1000, 17)), "n": {"k": 3}}
    future = zarrckpt.async_save(sd, s3_url, storage_options=s3_server.options())
    assert future.result(timeout=120) is None
    out = {"x": torch.zeros(1000, 17, dtype=torch.float16), "n": {"k": 0}}
    zarrckpt.load(out, s3_url, storage_options=s3_server.options())
    assert_bits_equal(sd["x"], out["x"])
    assert out["n"] == {"k": 3}


def test_overwrite_replaces_everything_and_refuses_without_flag(s3_server, s3_url):
    opts = s3_server.options()
    zarrckpt.save({"old": torch.ones(100), "same": torch.ones(4)}, s3_url, storage_options=opts)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        zarrckpt.save({"x": torch.ones(1)}, s3_url, storage_options=opts)
    new = {"same": torch.full((4,), 2.0), "fresh": torch.arange(3)}
    zarrckpt.save(new, s3_url, storage_options=opts, overwrite=True)
    store = ObjectStore(s3_url, opts)
    assert store.leftovers() == []
    assert not any(k.startswith("old/") for k in store.object_keys())  # nothing stale remains
    ck = zarrckpt.open(s3_url, storage_options=opts)
    assert sorted(ck) == ["fresh", "same"]
    assert_bits_equal(new["same"], ck.read("same"))


def test_overwrite_deletes_the_marker_before_writing(s3_server, s3_url, monkeypatch):
    """What a reader sees during an overwrite: no loadable checkpoint from the
    moment the new save starts writing until it commits."""
    from zarrckpt.storage import _object

    opts = s3_server.options()
    zarrckpt.save({"a": torch.ones(8)}, s3_url, storage_options=opts)
    seen = []
    real_commit = _object.ObjectStaging.commit

    def commit(self, *args, **kwargs):
        with pytest.raises(IncompleteCheckpointError):
            zarrckpt.open(s3_url, storage_options=opts)
        seen.append(True)
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(_object.ObjectStaging, "commit", commit)
    zarrckpt.save({"a": torch.zeros(8)}, s3_url, storage_options=opts, overwrite=True)
    assert seen == [True]
    assert_bits_equal(torch.zeros(8), zarrckpt.open(s3_url, storage_options=opts).read("a"))


_KILLED_SAVE = r"""
import os, signal, sys, torch, zarrckpt
from zarrckpt.storage import _object
from zarrckpt.format._marker import COMMIT_MARKER
url, opts = sys.argv[1], __import__("json").loads(sys.argv[2])
real_put = _object.ObjectStaging._put
def put(self, key, data, **kw):
    if key == COMMIT_MARKER:  # killed after every data object and the root, before the marker
        os.kill(os.getpid(), signal.SIGKILL)
    return real_put(self, key, data, **kw)
_object.ObjectStaging._put = put
zarrckpt.save({"w": torch.arange(5000.0), "v": torch.ones(3)}, url, storage_options=opts)
"""


def check_killed_save_is_invisible(url: str, opts: dict, env: dict[str, str]) -> None:
    """A save SIGKILLed before its marker (in a subprocess): nothing loads or opens,
    ``verify`` lists what it left, and the next save (no overwrite needed: nothing
    was committed) removes it."""
    from zarrckpt.inspect import verify
    from zarrckpt.storage._object_config import ObjectPath

    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, url, json.dumps(opts)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = ObjectStore(url, opts)
    left = store.leftovers()
    assert "zarr.json" in left and len(left) == len(store.object_keys()) > 2
    with pytest.raises(IncompleteCheckpointError, match="commit marker"):
        zarrckpt.load({"w": torch.zeros(5000)}, url, storage_options=opts)
    with pytest.raises(IncompleteCheckpointError):
        zarrckpt.open(url, storage_options=opts)
    report = verify(ObjectPath(url, opts))  # verify lists the dead save's objects
    assert not report.ok and sorted(report.leftovers) == sorted(left)
    zarrckpt.save({"z": torch.ones(2)}, url, storage_options=opts)
    assert store.leftovers() == []
    assert list(zarrckpt.open(url, storage_options=opts)) == ["z"]


def test_save_killed_before_the_marker_is_invisible(s3_server, s3_url):
    check_killed_save_is_invisible(s3_url, s3_server.options(), s3_server.env)


def test_failed_save_removes_what_it_wrote(s3_server, s3_url, monkeypatch):
    """A write that fails after others succeeded: the save raises and its abort
    deletes every object it wrote; the path holds no checkpoint."""
    from zarrckpt.storage import _object_staging

    opts = s3_server.options()
    real = _object_staging.ObjectStaging.write_chunk
    calls = []

    def write_chunk(self, key, buffers, **kw):
        calls.append(key)
        if len(calls) == 3:
            raise OSError("injected write failure")
        return real(self, key, buffers, **kw)

    monkeypatch.setattr(_object_staging.ObjectStaging, "write_chunk", write_chunk)
    sd = {f"t{i}": torch.ones(10) for i in range(6)}
    with pytest.raises(OSError, match="injected"):
        zarrckpt.save(sd, s3_url, storage_options=opts, threads=1)
    assert len(calls) >= 3
    assert ObjectStore(s3_url, opts).object_keys() == []
    with pytest.raises(CheckpointNotFoundError):
        zarrckpt.load({"t0": torch.zeros(10)}, s3_url, storage_options=opts)


def test_refuses_a_prefix_holding_other_objects(s3_server, s3_url):
    import obstore

    store = ObjectStore(s3_url, s3_server.options())
    obstore.put(store.client, store.full_key("notes.txt"), b"mine")
    with pytest.raises(CheckpointExistsError, match="not a zarrckpt checkpoint"):
        zarrckpt.save(
            {"a": torch.ones(1)}, s3_url, storage_options=s3_server.options(), overwrite=True
        )
    assert store.object_keys() == ["notes.txt"]
    with pytest.raises(CheckpointNotFoundError, match="notes.txt"):
        zarrckpt.open(s3_url, storage_options=s3_server.options())


def test_environment_supplies_endpoint_and_credentials(s3_server, s3_url, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    zarrckpt.save({"a": torch.arange(4)}, s3_url)
    out = {"a": torch.zeros(4, dtype=torch.long)}
    zarrckpt.load(out, s3_url)
    assert out["a"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("path", "options", "match"),
    [
        ("gs://bucket/x", None, "not supported yet"),
        ("s3://", None, "names no bucket"),
        ("s3://bucket/x", {"no_such_option": 1}, "cannot use storage_options"),
        ("s3://bucket/x", {"max_retries": -1}, "max_retries"),
        ("s3://bucket/x", {"retry_timeout": "soon"}, "retry_timeout"),
    ],
)
def test_invalid_urls_and_options(path, options, match):
    with pytest.raises(InvalidPathError, match=match):
        zarrckpt.load({}, path, storage_options=options)


def test_file_urls_are_local_paths(tmp_path):
    path = tmp_path / "ck"
    zarrckpt.save({"a": torch.ones(2)}, f"file://{path}")
    assert (path / "zarr.json").is_file()
    out = {"a": torch.zeros(2)}
    zarrckpt.load(out, str(path))
    assert out["a"].tolist() == [1.0, 1.0]


def test_shard_files_are_refused_on_an_object_store(s3_server, s3_url):
    """Ranks cannot write one object together: file_layout="shard" is refused before
    anything is written, and nothing lands at the prefix."""
    with pytest.raises(zarrckpt.errors.InvalidArgumentError, match="file_layout='shard'"):
        zarrckpt.save({"w": torch.ones(4)}, s3_url, storage_options=s3_server.options(),
                      file_layout="shard")
    assert ObjectStore(s3_url, s3_server.options()).list_dir() == []
