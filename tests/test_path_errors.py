"""Paths: honest errors for what a path is (issue 11, item 6) and missing
parent directories created on save (item 8), single process and on 2 gloo ranks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_bits_equal
from torch.distributed.checkpoint.api import CheckpointException

import zarrckpt
from zarrckpt import ZarrStorageReader, ZarrStorageWriter, convert
from zarrckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedSaveError,
    IncompleteCheckpointError,
    InvalidPathError,
    UnsafeCheckpointError,
    ZarrCkptError,
)
from zarrckpt.testing import run_distributed

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled|unavailable):UserWarning"
)

STAGING_INFIX = ".zarrckpt-tmp-"


def sample() -> dict[str, Any]:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 7}


def target() -> dict[str, Any]:
    return {"w": torch.zeros(3, 4), "step": 0}


def readers(path: Any) -> list[tuple[str, Callable[[], Any]]]:
    """zarrckpt.load and zarrckpt.open of ``path``."""
    return [
        ("load", lambda: zarrckpt.load(target(), path)),
        ("open", lambda: zarrckpt.open(path)),
    ]


def not_a_checkpoint(path: Any) -> list[str]:
    """The messages of every reader, each checked to be CheckpointNotFoundError
    and not the 'incomplete' diagnosis of a save that did not finish."""
    messages = []
    for name, read in readers(path):
        with pytest.raises(CheckpointNotFoundError) as info:
            read()
        assert not isinstance(info.value, IncompleteCheckpointError), name
        assert "incomplete" not in str(info.value) and "did not finish" not in str(info.value)
        messages.append(str(info.value))
    return messages


# ------------------------------------------------------------------ item 6: what a path is


def test_empty_directory_is_not_a_checkpoint(tmp_path: Any) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    for message in not_a_checkpoint(path):
        assert str(path) in message and "not a zarrckpt checkpoint" in message
        assert "empty directory" in message


def test_unrelated_directory_names_a_few_entries(tmp_path: Any) -> None:
    path = tmp_path / "project"
    path.mkdir()
    for name in ("README.md", "train.py", "config.yaml", "data.csv", "notes.txt"):
        (path / name).write_text("x")
    (path / "src").mkdir()
    for message in not_a_checkpoint(path):
        assert "not a zarrckpt checkpoint" in message
        assert "6 entries" in message and "'README.md'" in message and "and 2 more" in message


def test_dcp_checkpoint_directory_says_dcp_and_what_to_use(tmp_path: Any) -> None:
    path = tmp_path / "dcp_ckpt"
    dcp.save(sample(), checkpoint_id=path)  # FileSystemWriter: .metadata, __0_0.distcp
    for message in not_a_checkpoint(path):
        assert "DCP" in message and "'.metadata'" in message
        assert "checkpoint_id=path" in message  # dcp.load with DCP's own reader
        assert "zarrckpt.convert.from_dcp" in message


def test_zarr_storage_reader_on_a_dcp_directory(tmp_path: Any) -> None:
    path = tmp_path / "dcp_ckpt"
    dcp.save(sample(), checkpoint_id=path)
    with pytest.raises(CheckpointException) as info:
        dcp.load(target(), storage_reader=ZarrStorageReader(path))
    text = str(info.value)
    assert "is a zarrckpt checkpoint" not in text
    assert "not a zarrckpt checkpoint" in text and "DCP" in text
    assert "ZarrStorageReader reads zarrckpt checkpoints only" in text


def test_directory_of_checkpoints_names_them(tmp_path: Any) -> None:
    run = tmp_path / "run"
    for step in (100, 200, 1000):
        zarrckpt.save(sample(), run / f"step_{step}", fsync=False)
    (run / "train.log").write_text("x")
    for message in not_a_checkpoint(run):
        assert "not a checkpoint itself" in message
        assert "holding 3 zarrckpt checkpoint(s)" in message
        assert "'step_100', 'step_200', 'step_1000'" in message  # natural order
        assert "pass one of them" in message and str(run / "step_1000") in message


def test_directory_of_dcp_checkpoints_names_them(tmp_path: Any) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        dcp.save(sample(), checkpoint_id=run / f"step_{step}")
    for message in not_a_checkpoint(run):
        assert "holding 2 DCP checkpoint(s) ('step_1', 'step_2')" in message
        assert "convert.from_dcp" in message


def test_system_temp_directory_is_not_a_checkpoint() -> None:
    path = tempfile.gettempdir()
    for message in not_a_checkpoint(path):  # it may hold checkpoints of other tests
        assert "the system temporary directory" in message


def test_only_an_unfinished_zarrckpt_save_is_incomplete(tmp_path: Any) -> None:
    # a zarrckpt checkpoint whose commit marker is missing is "incomplete"
    zarrckpt.save(sample(), tmp_path / "ck", fsync=False)
    shutil.rmtree(tmp_path / "ck" / "~commit")
    for _name, read in readers(tmp_path / "ck"):
        with pytest.raises(IncompleteCheckpointError, match="commit marker .* is missing"):
            read()
    # so is a directory holding the staging directory of an unfinished dcp.save
    # through ZarrStorageWriter into it (which writes beside other files)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("lr: 1")
    (tmp_path / "run" / f"{STAGING_INFIX}0123456789ab").mkdir()
    for _name, read in readers(tmp_path / "run"):
        with pytest.raises(IncompleteCheckpointError, match="did not finish") as info:
            read()
        assert f"{STAGING_INFIX}0123456789ab" in str(info.value)
    # a save killed before its commit leaves its staging directory beside the
    # path, which does not exist: not found, and the message names the staging
    os.rename(tmp_path / "ck", tmp_path / f".new{STAGING_INFIX}0123456789ab")
    for name, read in readers(tmp_path / "new"):
        with pytest.raises(CheckpointNotFoundError, match="did not finish") as info:
            read()
        assert f".new{STAGING_INFIX}0123456789ab" in str(info.value), name
    # and a path with nothing at all is simply not there
    for _name, read in readers(tmp_path / "nowhere"):
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint at") as info:
            read()
        assert "did not finish" not in str(info.value)


def test_garbage_file_is_neither_torch_save_nor_safetensors(tmp_path: Any) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(7, 107)))
    with pytest.raises(CorruptCheckpointError) as info:
        zarrckpt.load(target(), garbage)
    assert not isinstance(info.value, UnsafeCheckpointError)
    message = str(info.value)
    assert "neither a torch.save file nor a safetensors file" in message
    assert "zarrckpt checkpoint is a directory" in message and "pickle" not in message
    # the legacy (pre-1.6) torch.save format is still recognised and loaded
    legacy = tmp_path / "legacy.pt"
    torch.save(sample(), legacy, _use_new_zipfile_serialization=False)
    loaded = target()
    zarrckpt.load(loaded, legacy)
    assert_bits_equal(sample()["w"], loaded["w"])


def test_empty_path_is_refused_before_anything_is_written(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    calls: list[Callable[[], Any]] = [
        lambda: zarrckpt.save(sample(), ""),
        lambda: zarrckpt.async_save(sample(), "").result(),
        lambda: zarrckpt.load(target(), ""),
        lambda: zarrckpt.open(""),
        lambda: ZarrStorageWriter(""),
    ]
    for call in calls:
        with pytest.raises(InvalidPathError, match=r"path is empty \(''\)") as info:
            call()
        assert isinstance(info.value, ValueError)
    assert os.listdir(tmp_path) == ["work"] and os.listdir(work) == []  # no staging anywhere


URL = "gs://bucket/run/step_1"  # a scheme zarrckpt refuses (no loopback GCS server)


def _url_calls(ckpt: str, pt: str) -> dict[str, Callable[[], Any]]:
    return {
        "save": lambda: zarrckpt.save(sample(), URL),
        "async_save": lambda: zarrckpt.async_save(sample(), URL).result(),
        "load": lambda: zarrckpt.load(target(), URL),
        "open": lambda: zarrckpt.open(URL),
        "verify": lambda: zarrckpt.inspect.verify(URL),
        "from_torch_save": lambda: convert.from_torch_save(pt, URL),
        "from_torch_save_src": lambda: convert.from_torch_save("gs://b/m.pt", ckpt + "x"),
        "to_torch_save": lambda: convert.to_torch_save(ckpt, "gs://b/m.pt"),
        "from_safetensors": lambda: convert.from_safetensors("gs://b/m.safetensors", URL),
        "to_safetensors": lambda: convert.to_safetensors(ckpt, "gs://b/m.safetensors"),
        "from_dcp": lambda: convert.from_dcp("gs://b/dcp", ckpt + "y"),
        "to_dcp": lambda: convert.to_dcp(ckpt, "gs://b/dcp"),
        "convert": lambda: convert.convert(pt, URL),
        "ZarrStorageWriter": lambda: ZarrStorageWriter(URL),
        "ZarrStorageReader": lambda: ZarrStorageReader(URL),
        "dcp.save checkpoint_id": lambda: dcp.save(
            sample(), checkpoint_id=URL, storage_writer=ZarrStorageWriter(ckpt + "z")
        ),
        "dcp.load checkpoint_id": lambda: dcp.load(
            target(), checkpoint_id=URL, storage_reader=ZarrStorageReader(ckpt)
        ),
    }


def test_unsupported_url_schemes_are_refused_by_every_entry_point(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, pt = str(tmp_path / "ck"), str(tmp_path / "m.pt")
    zarrckpt.save(sample(), ckpt, fsync=False)
    torch.save(sample(), pt)
    before = sorted(os.listdir(tmp_path))
    for name, call in _url_calls(ckpt, pt).items():
        with pytest.raises(InvalidPathError, match=r"gs://\) is not supported yet"):
            call()
        assert sorted(os.listdir(tmp_path)) == before, name  # nothing written (no "s3:" dir)
    from zarrckpt.cli import main

    assert main(["ls", URL]) == 2
    err = capsys.readouterr().err
    assert "zarrckpt ls: error:" in err and "not supported yet" in err


def test_storage_options_for_a_local_path_are_refused(tmp_path: Any) -> None:
    path = tmp_path / "ck"
    options = {"anon": True}
    with pytest.raises(InvalidPathError, match="storage_options") as info:
        zarrckpt.save(sample(), path, storage_options=options)
    assert "only to object-store URLs" in str(info.value)
    with pytest.raises(InvalidPathError, match="storage_options"):
        zarrckpt.async_save(sample(), path, storage_options=options).result()
    assert not path.exists()
    zarrckpt.save(sample(), path, storage_options=None, fsync=False)
    with pytest.raises(InvalidPathError, match="storage_options"):
        zarrckpt.load(target(), path, storage_options=options)


# ------------------------------------------------------------ item 8: missing parents


def test_save_creates_missing_parents(tmp_path: Any) -> None:
    path = tmp_path / "runs" / "exp1" / "step_1"
    zarrckpt.save(sample(), path, fsync=False)
    loaded = target()
    zarrckpt.load(loaded, path)
    assert_bits_equal(sample()["w"], loaded["w"])
    assert os.listdir(tmp_path / "runs" / "exp1") == ["step_1"]


def test_async_save_creates_missing_parents(tmp_path: Any) -> None:
    path = tmp_path / "runs" / "exp1" / "step_1"
    zarrckpt.async_save(sample(), path, fsync=False).result()
    loaded = target()
    zarrckpt.load(loaded, path)
    assert_bits_equal(sample()["w"], loaded["w"])


def test_converters_create_missing_parents(tmp_path: Any) -> None:
    pt = tmp_path / "model.pt"
    torch.save(sample(), pt)
    out = tmp_path / "out"
    convert.from_torch_save(pt, out / "a" / "ck", fsync=False)
    convert.to_torch_save(out / "a" / "ck", out / "b" / "model.pt")
    convert.to_safetensors(out / "a" / "ck", out / "c" / "model.safetensors")
    convert.from_safetensors(out / "c" / "model.safetensors", out / "d" / "ck")
    convert.to_dcp(out / "a" / "ck", out / "e" / "dcp")
    convert.from_dcp(out / "e" / "dcp", out / "f" / "ck")
    convert.convert(pt, out / "g" / "model.safetensors")  # through a temporary checkpoint
    for ck in ("a/ck", "d/ck", "f/ck"):
        assert_bits_equal(sample()["w"], zarrckpt.open(out / ck).read("w"), ck)
    assert_bits_equal(sample()["w"], torch.load(out / "b" / "model.pt")["w"])
    assert sorted(os.listdir(out / "g")) == ["model.safetensors"]


def test_dcp_plugin_creates_missing_parents(tmp_path: Any) -> None:
    path = tmp_path / "runs" / "exp1" / "step_1"
    assert ZarrStorageWriter.validate_checkpoint_id(path)
    dcp.save(sample(), storage_writer=ZarrStorageWriter(path, fsync=False))
    loaded = target()
    dcp.load(loaded, storage_reader=ZarrStorageReader(path))
    assert_bits_equal(sample()["w"], loaded["w"])


def test_parent_that_is_a_file_is_refused(tmp_path: Any) -> None:
    (tmp_path / "runs").write_text("a file")
    with pytest.raises(CheckpointNotFoundError, match="not a directory") as info:
        zarrckpt.save(sample(), tmp_path / "runs" / "exp1" / "step_1")
    assert str(tmp_path / "runs") in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["runs"]


# ------------------------------------------------------------------ 2 gloo ranks


def _sharded_state(world_size: int, fill: bool = True) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(48, dtype=torch.float32).reshape(8, 6) if fill else torch.zeros(8, 6)
    return {"w": distribute_tensor(full, mesh, [Shard(0)]), "step": 3 if fill else 0}


def _missing_parents_ws2(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """zarrckpt.save, async_save and dcp.save (plug-in) under missing parents."""
    paths = {
        "save": os.path.join(base, "runs", "a", "step_1"),
        "async_save": os.path.join(base, "runs", "b", "step_1"),
        "dcp.save": os.path.join(base, "runs", "c", "step_1"),
    }
    sd = _sharded_state(world_size)
    zarrckpt.save(sd, paths["save"], fsync=False)
    zarrckpt.async_save(sd, paths["async_save"], fsync=False).result()
    dcp.save(sd, storage_writer=ZarrStorageWriter(paths["dcp.save"], fsync=False))
    out: dict[str, Any] = {}
    for name, path in paths.items():
        loaded = _sharded_state(world_size, fill=False)
        zarrckpt.load(loaded, path)
        out[name] = (loaded["w"].full_tensor().clone(), loaded["step"])
    return out


def _staging_visibility_ws2(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """Rank 1 sees rank 0's staging directory late (NFS caches), or never."""
    from zarrckpt.storage import _paths

    real_isdir = os.path.isdir
    out: dict[str, Any] = {}
    for case, hidden in (("late", 3), ("never", 10**9)):
        seen = {"checks": 0}

        def isdir(p: Any, hidden: int = hidden, seen: dict[str, int] = seen) -> bool:
            if rank == 1 and STAGING_INFIX in os.fspath(p):
                seen["checks"] += 1
                if seen["checks"] <= hidden:
                    return False
            return real_isdir(p)

        path = os.path.join(base, case, "ck")
        with mock.patch.object(_paths, "VISIBILITY_TIMEOUT", 0.5), mock.patch(
            "os.path.isdir", isdir
        ):
            try:
                zarrckpt.save(_sharded_state(world_size), path, fsync=False)
                out[case] = {"ok": True}
            except ZarrCkptError as e:
                out[case] = {"ok": False, "type": type(e).__name__, "message": str(e)}
    return out


@pytest.fixture(scope="module")
def ws2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("ws2")
    return {
        "base": base,
        "parents": run_distributed(_missing_parents_ws2, 2, str(base / "parents")),
        "visibility": run_distributed(_staging_visibility_ws2, 2, str(base / "vis")),
    }


@pytest.mark.parametrize("entry", ["save", "async_save", "dcp.save"])
def test_distributed_save_creates_missing_parents(ws2: dict[str, Any], entry: str) -> None:
    expected = torch.arange(48, dtype=torch.float32).reshape(8, 6)
    for rank_result in ws2["parents"]:
        w, step = rank_result[entry]
        assert_bits_equal(expected, w, entry)
        assert step == 3
    assert os.listdir(ws2["base"] / "parents" / "runs" / "a") == ["step_1"]


def test_distributed_save_waits_for_a_late_staging_directory(ws2: dict[str, Any]) -> None:
    assert [r["late"] for r in ws2["visibility"]] == [{"ok": True}, {"ok": True}]
    assert zarrckpt.open(ws2["base"] / "vis" / "late" / "ck").read("w").shape == (8, 6)


def test_distributed_save_reports_a_staging_directory_no_rank_can_see(
    ws2: dict[str, Any],
) -> None:
    rank0, rank1 = (r["never"] for r in ws2["visibility"])
    assert not rank0["ok"] and not rank1["ok"]
    assert rank1["type"] == "CheckpointNotFoundError"
    assert "rank 1 cannot see the staging directory" in rank1["message"]
    assert "filesystem they share" in rank1["message"]
    assert rank0["type"] == DistributedSaveError.__name__
    assert "rank 1" in rank0["message"] and "cannot see" in rank0["message"]
    assert os.listdir(ws2["base"] / "vis" / "never") == []  # nothing committed, staging removed
