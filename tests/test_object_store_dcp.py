"""The DCP plug-ins (ZarrStorageWriter / ZarrStorageReader) on an S3 server (moto on
127.0.0.1): ``dcp.save`` / ``dcp.load`` single-process and FSDP2 on 2 gloo ranks
resharded to TP, every tensor bit-exact; the result is an ordinary zarrckpt
checkpoint (``zarrckpt.load`` / ``verify`` read it); overwrite refusal; a save
that fails before its commit leaves nothing loadable and no objects behind."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import DTYPES, assert_bits_equal, random_tensor
from torch.distributed.checkpoint.api import CheckpointException

import zarrckpt
from zarrckpt import ZarrStorageReader, ZarrStorageWriter
from zarrckpt.errors import (
    CheckpointExistsError,
    IncompleteCheckpointError,
    InvalidPathError,
    UnsafeCheckpointError,
)
from zarrckpt.storage._object import ObjectStore
from zarrckpt.testing import run_distributed


class Opaque:
    """A value only pickle can store."""


def _failure(exc: CheckpointException) -> BaseException:
    """The (first) per-rank exception DCP wrapped."""
    return next(iter(exc.failures.values()))[0]


def _state() -> dict:
    sd: dict = {f"t{i}": random_tensor(d, (37, 5), seed=i) for i, d in enumerate(DTYPES)}
    sd["big"] = random_tensor(torch.float32, (300_000,), seed=99)  # several chunks
    sd["pair"] = (torch.arange(40_000, dtype=torch.int64), "x")  # a tensor in a BYTE_IO value
    sd["meta"] = {"step": 7, "name": "run", "lr": 0.5}
    return sd


def _zeros_like(sd: dict) -> dict:
    out: dict = {k: torch.zeros_like(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    out["pair"] = (torch.zeros(40_000, dtype=torch.int64), "")
    out["meta"] = {"step": 0, "name": "", "lr": 0.0}
    return out


def _check(sd: dict, out: dict) -> None:
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, out[k], k)
    assert_bits_equal(sd["pair"][0], out["pair"][0], "pair.0")
    assert out["pair"][1] == "x"
    assert out["meta"] == sd["meta"]


def test_dcp_save_and_load_through_the_plugins(s3_server, s3_url):
    options = s3_server.options()
    sd = _state()
    writer = ZarrStorageWriter(s3_url, storage_options=options, fsync=False, chunk_bytes=1 << 18)
    dcp.save(sd, storage_writer=writer)
    store = ObjectStore(s3_url, options)
    assert store.leftovers() == []  # the save record is gone, nothing stray
    assert len(store.object_keys()) > len(sd)  # several objects for the chunked tensor
    out = _zeros_like(sd)
    reader = ZarrStorageReader(s3_url, storage_options=options)
    dcp.load(out, storage_reader=reader)
    _check(sd, out)
    assert reader.bytes_read > 0
    # an ordinary zarrckpt checkpoint
    again = _zeros_like(sd)
    zarrckpt.load(again, s3_url, storage_options=options)
    _check(sd, again)
    assert zarrckpt.open(s3_url, storage_options=options).verify().ok
    assert ZarrStorageReader.validate_checkpoint_id(s3_url) is False  # no env credentials
    assert ZarrStorageWriter.validate_checkpoint_id(s3_url)


def test_dcp_save_refuses_an_existing_checkpoint_then_overwrites(s3_server, s3_url):
    options = s3_server.options()
    writer = ZarrStorageWriter(s3_url, storage_options=options)
    dcp.save({"a": torch.ones(3)}, storage_writer=writer)
    with pytest.raises(CheckpointException) as info:
        dcp.save(
            {"a": torch.zeros(3)}, storage_writer=ZarrStorageWriter(s3_url, storage_options=options)
        )
    refusal = _failure(info.value)
    assert isinstance(refusal, CheckpointExistsError)
    assert str(refusal).startswith("Checkpoint already exists")
    out = {"a": torch.zeros(3)}  # the refused save touched nothing
    dcp.load(out, storage_reader=ZarrStorageReader(s3_url, storage_options=options))
    assert torch.equal(out["a"], torch.ones(3))
    writer = ZarrStorageWriter(s3_url, storage_options=options, overwrite=True)
    dcp.save({"a": torch.full((3,), 2.0)}, storage_writer=writer)
    out = {"a": torch.zeros(3)}
    dcp.load(out, storage_reader=ZarrStorageReader(s3_url, storage_options=options))
    assert torch.equal(out["a"], torch.full((3,), 2.0))


def test_dcp_save_failing_before_commit_leaves_nothing(s3_server, s3_url):
    options = s3_server.options()

    sd = {"a": torch.ones(1000), "obj": Opaque()}  # needs allow_pickle: write_data fails
    writer = ZarrStorageWriter(s3_url, storage_options=options)
    with pytest.raises(CheckpointException) as info:
        dcp.save(sd, storage_writer=writer)
    assert isinstance(_failure(info.value), UnsafeCheckpointError)
    store = ObjectStore(s3_url, options)
    assert store.object_keys() != []  # the staged save is there until the writer goes
    with pytest.raises(IncompleteCheckpointError):
        zarrckpt.load({"a": torch.zeros(1000)}, s3_url, storage_options=options)
    del writer, info  # the traceback holds the writer too
    import gc

    gc.collect()  # the writer's finalizer removes what the failed save wrote
    assert store.object_keys() == []
    writer = ZarrStorageWriter(s3_url, storage_options=options)
    dcp.save({"a": torch.ones(1000)}, storage_writer=writer)
    out = {"a": torch.zeros(1000)}
    zarrckpt.load(out, s3_url, storage_options=options)
    assert torch.equal(out["a"], torch.ones(1000))


def test_storage_options_for_a_local_path_are_refused(tmp_path):
    with pytest.raises(InvalidPathError, match="storage_options"):
        ZarrStorageWriter(str(tmp_path / "c"), storage_options={"region": "x"})
    with pytest.raises(InvalidPathError, match="storage_options"):
        ZarrStorageReader(str(tmp_path / "c"), storage_options={"region": "x"})


@pytest.mark.slow
def test_dcp_plugins_fsdp2_ws2_to_tp_and_one_process(s3_server, s3_url, tmp_path):
    import _dcp_s3_cases as cases
    from _dcp_cases import compare, flat

    options = s3_server.options()
    results = run_distributed(cases.save_then_load_tp, 2, s3_url, options, str(tmp_path))
    for rank, result in enumerate(results):
        assert result["compared"] > 0
        assert result["mismatched"] == [], (rank, result)
    # one process, plain tensors, through the reader
    reference = torch.load(os.path.join(tmp_path, "reference.pt"), weights_only=True)
    target = {
        "model": {k: torch.zeros_like(v) for k, v in reference["model"].items()},
        "optim": reference["optim"],
        "step": 0,
        "note": {"tags": [], "lr": 0.0},
    }
    target["optim"] = {
        "state": {
            k: {n: torch.zeros_like(t) if isinstance(t, torch.Tensor) else t for n, t in s.items()}
            for k, s in reference["optim"]["state"].items()
        },
        "param_groups": reference["optim"]["param_groups"],
    }
    dcp.load(target, storage_reader=ZarrStorageReader(s3_url, storage_options=options))
    assert compare(flat(reference), flat(target)) == []
