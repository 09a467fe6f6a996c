"""ZarrStorageWriter behaves like DCP's FileSystemWriter where DCP's own code
and its users rely on it (issue 11, item 14): it writes into an existing
directory and keeps the files there, still committing the checkpoint as a
whole (commit marker last), and refuses an existing checkpoint with DCP's
words. ``zarrckpt.save`` keeps its stricter rule, with an error that says why."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_bits_equal
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

import zarrckpt
from zarrckpt import ZarrStorageReader, ZarrStorageWriter
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
)
from zarrckpt.storage import _inplace
from zarrckpt.testing import run_distributed

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled|unavailable):UserWarning",
    "ignore:Detected an existing checkpoint:UserWarning",
)

STAGING_INFIX = ".zarrckpt-tmp-"


def failure(exc: CheckpointException) -> BaseException:
    """The (first) per-rank exception DCP wrapped."""
    return next(iter(exc.failures.values()))[0]


def state(seed: int = 0, keys: tuple[str, ...] = ("a.weight", "a.bias", "b")) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(4, 3, generator=g) for k in keys} | {"step": seed}


def load_via_dcp(path: Any, like: dict[str, Any]) -> dict[str, Any]:
    target = {k: torch.zeros_like(v) if torch.is_tensor(v) else -1 for k, v in like.items()}
    dcp.load(target, storage_reader=ZarrStorageReader(path))
    return target


def assert_state(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    assert list(actual) == list(expected)
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, actual[k], k)
        else:
            assert actual[k] == v, k


def other_files(directory: Any) -> dict[str, bytes]:
    """A config file and a log directory, as trainers keep beside checkpoints."""
    files = {"config.yaml": b"lr: 0.001\n", "logs/train.log": b"step 1 loss 2.0\n"}
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(directory, rel)) or directory, exist_ok=True)
        with open(os.path.join(directory, rel), "wb") as f:
            f.write(data)
    return files


def assert_kept(directory: Any, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        with open(os.path.join(directory, rel), "rb") as f:
            assert f.read() == data, rel


# ------------------------------------------------------------ writing beside other files


def test_torch_save_to_dcp_through_the_plugin_keeps_its_source(tmp_path: Any) -> None:
    """DCP's own format_utils.torch_save_to_dcp(src, dst), run with ZarrStorageWriter in
    place of FileSystemWriter, as in seed 000: the checkpoint lands next to its source."""
    sd = {"model": state(1)}
    src = tmp_path / "model.pt"
    torch.save(sd, src)
    source_bytes = src.read_bytes()
    fmt = "torch.distributed.checkpoint.format_utils.FileSystemWriter"
    with mock.patch(fmt, ZarrStorageWriter):
        torch_save_to_dcp(src, tmp_path)
    assert src.read_bytes() == source_bytes
    assert zarrckpt.open(tmp_path).read("model.a.weight").shape == (4, 3)
    target = {"model": {k: torch.zeros(4, 3) for k in ("a.weight", "a.bias", "b")} | {"step": 0}}
    dcp.load(target, checkpoint_id=tmp_path, storage_reader=ZarrStorageReader(tmp_path))
    assert_state(sd["model"], target["model"])
    zarrckpt.load(target, tmp_path)
    assert_state(sd["model"], target["model"])


def test_dcp_save_into_a_directory_with_other_files_keeps_them(tmp_path: Any) -> None:
    files = other_files(tmp_path)
    sd = state(2)
    dcp.save(sd, storage_writer=ZarrStorageWriter(tmp_path, fsync=False))
    assert_kept(tmp_path, files)
    assert_state(sd, load_via_dcp(tmp_path, sd))
    assert zarrckpt.open(tmp_path).keys() == ["a.weight", "a.bias", "b"]
    assert not [n for n in os.listdir(tmp_path) if STAGING_INFIX in n]
    assert not [n for n in os.listdir(tmp_path.parent) if STAGING_INFIX in n]
    assert zarrckpt.inspect.verify(tmp_path).ok


def test_dcp_save_into_an_existing_empty_directory(tmp_path: Any) -> None:
    path = tmp_path / "ck"
    path.mkdir()
    sd = state(3)
    dcp.save(sd, storage_writer=ZarrStorageWriter(path, fsync=False))  # overwrite=False
    assert_state(sd, load_via_dcp(path, sd))


def test_overwrite_beside_other_files_replaces_only_the_checkpoint(tmp_path: Any) -> None:
    files = other_files(tmp_path)
    old = state(4, keys=("a.weight", "gone"))
    dcp.save(old, storage_writer=ZarrStorageWriter(tmp_path, fsync=False))
    new = state(5, keys=("a.weight", "fresh"))
    dcp.save(new, storage_writer=ZarrStorageWriter(tmp_path, overwrite=True, fsync=False))
    assert_kept(tmp_path, files)
    assert_state(new, load_via_dcp(tmp_path, new))
    # the old checkpoint's arrays went with it; only the new one's remain
    names = set(os.listdir(tmp_path))
    assert names == {"config.yaml", "logs", "zarr.json", "~commit", "a.weight", "fresh"}


def test_a_key_named_like_an_existing_file_is_refused(tmp_path: Any) -> None:
    (tmp_path / "b").write_bytes(b"user data")
    with pytest.raises(CheckpointException) as info:
        dcp.save(state(6), storage_writer=ZarrStorageWriter(tmp_path, fsync=False))
    error = failure(info.value)
    assert isinstance(error, CheckpointExistsError) and "'b'" in str(error)
    assert (tmp_path / "b").read_bytes() == b"user data"
    assert sorted(os.listdir(tmp_path)) == ["b"]  # nothing written, no staging left


# ------------------------------------------------------------- refusing like DCP does


def dcp_words(tmp_path: Any) -> str:
    """What FileSystemWriter(overwrite=False) says on an existing checkpoint."""
    path = tmp_path / "reference"
    dcp.save(state(), storage_writer=FileSystemWriter(path))
    with pytest.raises(CheckpointException) as info:
        dcp.save(state(), storage_writer=FileSystemWriter(path, overwrite=False))
    words = str(failure(info.value))
    assert words.startswith("Checkpoint already exists")
    return words


def test_overwrite_false_raises_with_dcps_words_and_zarrckpts(tmp_path: Any) -> None:
    words = dcp_words(tmp_path)
    path = tmp_path / "ck"
    dcp.save(state(7), storage_writer=ZarrStorageWriter(path, fsync=False))
    with pytest.raises(CheckpointException) as info:
        dcp.save(state(8), storage_writer=ZarrStorageWriter(path, fsync=False))
    assert words in str(info.value)  # code matching DCP's message keeps working
    error = failure(info.value)
    assert isinstance(error, CheckpointExistsError) and isinstance(error, FileExistsError)
    assert str(error).startswith(words)
    assert str(path) in str(error) and "overwrite=True" in str(error)
    assert_state(state(7), load_via_dcp(path, state(7)))


def test_overwrite_false_beside_other_files_raises_with_dcps_words(tmp_path: Any) -> None:
    words = dcp_words(tmp_path)
    path = tmp_path / "ck"
    files = other_files(path)
    dcp.save(state(9), storage_writer=ZarrStorageWriter(path, fsync=False))
    with pytest.raises(CheckpointException) as info:
        dcp.save(state(10), storage_writer=ZarrStorageWriter(path, fsync=False))
    assert str(failure(info.value)).startswith(words)
    assert_kept(path, files)
    assert_state(state(9), load_via_dcp(path, state(9)))


def test_a_dcp_checkpoint_is_refused_never_mixed(tmp_path: Any) -> None:
    words = dcp_words(tmp_path)
    path = tmp_path / "ck"
    dcp.save(state(11), storage_writer=FileSystemWriter(path))
    before = sorted(os.listdir(path))
    with pytest.raises(CheckpointException) as info:
        dcp.save(state(12), storage_writer=ZarrStorageWriter(path, fsync=False))
    assert str(failure(info.value)).startswith(words) and "DCP checkpoint" in str(info.value)
    with pytest.raises(CheckpointException) as info:
        dcp.save(state(12), storage_writer=ZarrStorageWriter(path, overwrite=True, fsync=False))
    assert "does not delete" in str(failure(info.value))
    assert sorted(os.listdir(path)) == before


# -------------------------------------------------------- a crash during the commit


@pytest.mark.parametrize("step", ["marker removed", "old removed", "root moved", "arrays moved"])
def test_failure_during_an_in_place_commit_never_leaves_a_loadable_mix(
    tmp_path: Any, step: str
) -> None:
    files = other_files(tmp_path)
    old = state(13, keys=("a.weight", "gone"))
    dcp.save(old, storage_writer=ZarrStorageWriter(tmp_path, fsync=False))
    new = state(14, keys=("a.weight", "fresh"))
    real_rename, real_remove_tree = os.rename, _inplace.remove_tree
    calls = {"rename": 0}

    def remove_tree(path: str) -> None:
        if step == "marker removed":
            raise OSError("simulated crash")
        real_remove_tree(path)

    def rename(src: Any, dst: Any) -> None:
        calls["rename"] += 1
        if step == "old removed" or (step == "root moved" and calls["rename"] == 2):
            raise OSError("simulated crash")
        real_rename(src, dst)

    def marker(*args: Any, **kwargs: Any) -> None:
        raise OSError("simulated crash")

    with mock.patch.object(_inplace, "remove_tree", remove_tree), mock.patch.object(
        _inplace.os, "rename", rename
    ), mock.patch.object(_inplace, "write_commit_marker", marker), pytest.raises(
        CheckpointException
    ):
        dcp.save(new, storage_writer=ZarrStorageWriter(tmp_path, overwrite=True, fsync=False))
    assert_kept(tmp_path, files)
    # never loadable: "incomplete" while a zarrckpt root metadata is there, else not
    # a checkpoint at all (between removing the old one and moving the new one in)
    expected = CheckpointNotFoundError if step == "old removed" else IncompleteCheckpointError
    with pytest.raises(expected) as info:
        zarrckpt.open(tmp_path)
    assert type(info.value) is expected
    with pytest.raises(CheckpointException):
        load_via_dcp(tmp_path, new)
    # the next save (overwrite=False is enough: nothing committed is there) cleans up
    dcp.save(new, storage_writer=ZarrStorageWriter(tmp_path, fsync=False))
    assert_state(new, load_via_dcp(tmp_path, new))
    assert_kept(tmp_path, files)
    assert set(os.listdir(tmp_path)) == {
        "config.yaml", "logs", "zarr.json", "~commit", "a.weight", "fresh"
    }


_KILL = textwrap.dedent(
    """
    import os, sys, torch
    import torch.distributed.checkpoint as dcp
    from zarrckpt import ZarrStorageWriter
    from zarrckpt.storage import _inplace
    path, kill_at = sys.argv[1], int(sys.argv[2])
    real, count = os.rename, [0]
    def rename(src, dst):
        count[0] += 1
        if count[0] == kill_at:
            os._exit(17)  # killed mid-commit: no cleanup, no finally
        real(src, dst)
    _inplace.os.rename = rename
    g = torch.Generator().manual_seed(15)
    sd = {k: torch.randn(4, 3, generator=g) for k in ("a.weight", "fresh")}
    dcp.save(sd, storage_writer=ZarrStorageWriter(path, overwrite=True))
    """
)


def test_killed_during_an_in_place_commit(tmp_path: Any) -> None:
    files = other_files(tmp_path)
    old = state(13, keys=("a.weight", "gone"))
    dcp.save(old, storage_writer=ZarrStorageWriter(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _KILL, str(tmp_path), "2"], env=env, capture_output=True
    )
    assert done.returncode == 17, done.stderr.decode()
    assert_kept(tmp_path, files)
    with pytest.raises(IncompleteCheckpointError):
        zarrckpt.load(dict.fromkeys(("a.weight", "fresh"), torch.zeros(4, 3)), tmp_path)
    assert [n for n in os.listdir(tmp_path) if n.startswith(STAGING_INFIX)]  # left by the kill
    new = state(16, keys=("a.weight", "fresh"))
    dcp.save(new, storage_writer=ZarrStorageWriter(tmp_path))
    assert_state(new, load_via_dcp(tmp_path, new))
    assert_kept(tmp_path, files)
    assert "gone" not in os.listdir(tmp_path)


# ---------------------------------------------------- zarrckpt.save keeps its rule


def test_zarrckpt_save_refuses_a_directory_with_other_files_and_says_why(
    tmp_path: Any,
) -> None:
    files = other_files(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(CheckpointExistsError) as info:
            zarrckpt.save(state(), tmp_path, overwrite=overwrite)
        message = str(info.value)
        assert "'config.yaml'" in message and "not a zarrckpt checkpoint" in message
        assert "directory of its own" in message  # why
        assert os.path.join(str(tmp_path), "checkpoint") in message  # what to do
        assert "ZarrStorageWriter" in message
    assert_kept(tmp_path, files)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "logs"]


def test_zarrckpt_save_overwrite_never_deletes_files_beside_a_checkpoint(
    tmp_path: Any,
) -> None:
    files = other_files(tmp_path)
    dcp.save(state(17), storage_writer=ZarrStorageWriter(tmp_path, fsync=False))
    with pytest.raises(CheckpointExistsError) as info:
        zarrckpt.save(state(18), tmp_path, overwrite=True)
    assert "'config.yaml'" in str(info.value) and "would delete" in str(info.value)
    assert_kept(tmp_path, files)
    assert_state(state(17), load_via_dcp(tmp_path, state(17)))


# ------------------------------------------------------------------ 2 gloo ranks


def _beside_files_ws2(rank: int, world_size: int, base: str) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(48, dtype=torch.float32).reshape(8, 6)
    out: dict[str, Any] = {}
    for i, overwrite in enumerate((False, True)):
        sd = {"w": distribute_tensor(full + i, mesh, [Shard(0)]), "step": i}
        dcp.save(sd, storage_writer=ZarrStorageWriter(base, overwrite=overwrite, fsync=False))
        target = {"w": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0)]), "step": -1}
        dcp.load(target, storage_reader=ZarrStorageReader(base))
        out[f"save {i}"] = (target["w"].full_tensor().clone(), target["step"])
    try:
        dcp.save(sd, storage_writer=ZarrStorageWriter(base, fsync=False))
        out["refused"] = None
    except CheckpointException as e:
        out["refused"] = str(e)
    return out


def test_distributed_dcp_save_beside_other_files(tmp_path: Any) -> None:
    files = other_files(tmp_path)
    results = run_distributed(_beside_files_ws2, 2, str(tmp_path))
    full = torch.arange(48, dtype=torch.float32).reshape(8, 6)
    for rank_result in results:
        for i in (0, 1):
            w, step = rank_result[f"save {i}"]
            assert_bits_equal(full + i, w)
            assert step == i
        assert "Checkpoint already exists and self.overwrite=False." in rank_result["refused"]
    assert_kept(tmp_path, files)
    assert_bits_equal(full + 1, zarrckpt.open(tmp_path).read("w"))
