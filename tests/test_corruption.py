"""Damaged checkpoints: every kind of damage gives its specific error.

One pristine checkpoint holds a tensor stored as plain chunk files and one
stored as sharded chunks (with a partial edge shard); each test damages a copy
and checks ``zarrckpt.load``, ``zarrckpt.open(p).read`` and
``open(p).to_dask()[k].compute()`` (and ``open(p)[k]`` where zarrckpt checks
metadata) raise :class:`CorruptCheckpointError` or
:class:`IncompleteCheckpointError` naming the key and the path.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import array_path, assert_bits_equal, save_fast

import zarrckpt
from zarrckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ZarrCkptError,
)
from zarrckpt.format._marker import COMMIT_MARKER

# chunk_bytes / inner_chunk_bytes chosen so that
#  * "plain" (5 rows of 60 kB) is cut into 5 one-row chunks of 60 kB <= 60 kB: plain files
#  * "sharded" (1100 x 100 float32) is cut into 250-row chunks of 100 kB > 60 kB, each
#    sharded into 125-row inner chunks; the last shard holds 100 rows (one partial
#    inner chunk, one inner chunk wholly outside the array)
#  The object-store layout ("pieces": one chunk file per piece) keeps these chunk files
#  apart; tests/test_binding.py damages the shard files of the default layout.
OPTIONS = {"chunk_bytes": 100_000, "inner_chunk_bytes": 60_000, "file_layout": "pieces"}


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "plain": torch.randn(5, 15_000, generator=g),
        "sharded": torch.randn(1100, 100, generator=g),
        "small": torch.arange(6, dtype=torch.int64),
        "step": 12,
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: Any) -> str:
    path = str(tmp_path_factory.mktemp("corruption") / "ckpt")
    save_fast(_state(), path, **OPTIONS)
    arrays = zarrckpt.open(path).metadata["arrays"]
    assert arrays["plain"]["inner_chunk_shape"] is None
    assert arrays["plain"]["chunk_shape"] == [1, 15_000]
    assert arrays["sharded"]["chunk_shape"] == [250, 100]
    assert arrays["sharded"]["inner_chunk_shape"] == [125, 100]
    return path


@pytest.fixture
def ckpt(pristine: str, tmp_path: Any) -> str:
    """A private copy of the pristine checkpoint, to damage."""
    dst = str(tmp_path / "ckpt")
    shutil.copytree(pristine, dst)
    return dst


def chunk_file(ckpt: str, fqn: str, *index: int) -> str:
    return os.path.join(ckpt, array_path(fqn), ".".join(["c", *map(str, index)]))


def flip_byte(path: str, offset: int) -> None:
    """Invert every bit of one byte (``offset`` may be negative: from the end)."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        pos = offset % size
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def truncate(path: str, by: int) -> None:
    size = os.path.getsize(path)
    os.truncate(path, max(0, size - by))


def _target() -> dict[str, Any]:
    return {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in _state().items()
    }


def assert_all_readers_fail(
    ckpt: str, fqn: str, error: type[Exception], *, on_open: bool = False
) -> None:
    """load, open().read, open().to_dask().compute() (and open()[k] for metadata
    damage) raise ``error`` whose message names ``ckpt`` (and ``fqn`` unless the
    damage is checkpoint-wide)."""
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("load", lambda: zarrckpt.load(_target(), ckpt)),
        ("open.read", lambda: zarrckpt.open(ckpt).read(fqn)),
        ("open.to_dask", lambda: zarrckpt.open(ckpt).to_dask()[fqn].compute()),
    ]
    if on_open:
        checks.append(("open", lambda: zarrckpt.open(ckpt)))
    for what, call in checks:
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert ckpt in message, f"{what}: message does not name the path: {message}"
        if not on_open:
            assert repr(fqn) in message or fqn in message, f"{what}: key not named: {message}"


def test_pristine_copy_is_readable(ckpt: str) -> None:
    target = _target()
    zarrckpt.load(target, ckpt)
    for k, v in _state().items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, target[k], k)
    assert target["step"] == 12


# ----------------------------------------------------------------- plain chunk files


@pytest.mark.parametrize("offset", [0, 30_000, -5, -1], ids=["first", "middle", "last-data", "crc"])
def test_flip_byte_in_plain_chunk(ckpt: str, offset: int) -> None:
    flip_byte(chunk_file(ckpt, "plain", 2, 0), offset)
    assert_all_readers_fail(ckpt, "plain", CorruptCheckpointError)
    # zarr-python's own crc32c codec sees it too: the checksums are real zarr ones
    with pytest.raises(Exception):  # noqa: B017 - zarr's own error type
        zarrckpt.open(ckpt)["plain"][...]


@pytest.mark.parametrize("by", [1, 4, 60_003, 10**9], ids=["1", "crc", "most", "all"])
def test_truncated_plain_chunk(ckpt: str, by: int) -> None:
    truncate(chunk_file(ckpt, "plain", 4, 0), by)
    assert_all_readers_fail(ckpt, "plain", CorruptCheckpointError)


def test_plain_chunk_with_trailing_garbage(ckpt: str) -> None:
    with open(chunk_file(ckpt, "plain", 1, 0), "ab") as f:
        f.write(b"\x00junk")
    assert_all_readers_fail(ckpt, "plain", CorruptCheckpointError)


def test_deleted_plain_chunk(ckpt: str) -> None:
    os.remove(chunk_file(ckpt, "plain", 3, 0))
    assert_all_readers_fail(ckpt, "plain", CorruptCheckpointError)


def test_deleted_chunk_of_0d_and_small_tensor(ckpt: str) -> None:
    os.remove(chunk_file(ckpt, "small", 0))
    assert_all_readers_fail(ckpt, "small", CorruptCheckpointError)


# ----------------------------------------------------------------- sharded chunk files


def _shard_index_size(n_inner: int = 2) -> int:
    return n_inner * 16 + 4


@pytest.mark.parametrize(
    "chunk,offset",
    [((1, 0), 0), ((1, 0), 70_000), ((4, 0), 10), ((1, 0), 50_003)],
    ids=["first-inner", "second-inner", "partial-edge-shard", "inner-crc"],
)
def test_flip_byte_in_shard_data(ckpt: str, chunk: tuple[int, int], offset: int) -> None:
    # format 3: the index comes first, the inner chunks after it
    flip_byte(chunk_file(ckpt, "sharded", *chunk), _shard_index_size() + offset)
    assert_all_readers_fail(ckpt, "sharded", CorruptCheckpointError)
    with pytest.raises(Exception):  # noqa: B017 - zarr's own error type
        zarrckpt.open(ckpt)["sharded"][...]


@pytest.mark.parametrize("at", [0, 7, 8, 16, 24, 31, 32, 35])
def test_flip_byte_in_shard_index(ckpt: str, at: int) -> None:
    """The index (offset/nbytes pairs, then its crc32c) at the start of the shard."""
    flip_byte(chunk_file(ckpt, "sharded", 2, 0), at)
    assert_all_readers_fail(ckpt, "sharded", CorruptCheckpointError)


def test_flip_byte_in_edge_shard_index_empty_entry(ckpt: str) -> None:
    """The last shard's second inner chunk is outside the array (index entry all ones)."""
    path = chunk_file(ckpt, "sharded", 4, 0)
    with open(path, "rb") as f:
        index = f.read(32)
    assert index[16:] == b"\xff" * 16
    flip_byte(path, 16)
    assert_all_readers_fail(ckpt, "sharded", CorruptCheckpointError)


@pytest.mark.parametrize("by", [1, 36, 50_000, 10**9])
def test_truncated_shard(ckpt: str, by: int) -> None:
    truncate(chunk_file(ckpt, "sharded", 0, 0), by)
    assert_all_readers_fail(ckpt, "sharded", CorruptCheckpointError)


def test_deleted_shard(ckpt: str) -> None:
    os.remove(chunk_file(ckpt, "sharded", 4, 0))
    assert_all_readers_fail(ckpt, "sharded", CorruptCheckpointError)


# ----------------------------------------------------------------- commit marker


def test_missing_commit_marker(ckpt: str) -> None:
    os.remove(os.path.join(ckpt, COMMIT_MARKER))
    assert_all_readers_fail(ckpt, "plain", IncompleteCheckpointError, on_open=True)
    with pytest.raises(IncompleteCheckpointError):
        zarrckpt.load({"step": 0}, ckpt)


@pytest.mark.parametrize("damage", ["flip", "empty", "not-json", "other-id-crc"])
def test_damaged_commit_marker(ckpt: str, damage: str) -> None:
    marker = os.path.join(ckpt, COMMIT_MARKER)
    if damage == "flip":
        flip_byte(marker, 2)
    elif damage == "empty":
        truncate(marker, 10**6)
    elif damage == "not-json":
        with open(marker, "w") as f:
            f.write("{ nope")
    else:
        with open(marker) as f:
            doc = json.load(f)
        members = doc["attributes"]["zarrckpt_commit"]
        members["root_metadata_crc32c"] = (members["root_metadata_crc32c"] + 1) % 2**32
        with open(marker, "w") as f:
            json.dump(doc, f)
    with pytest.raises((CorruptCheckpointError, IncompleteCheckpointError)) as info:
        zarrckpt.open(ckpt)
    assert ckpt in str(info.value)
    with pytest.raises(type(info.value)):
        zarrckpt.load(_target(), ckpt)


# ----------------------------------------------------------------- root zarr.json


@pytest.mark.parametrize("damage", ["flip", "truncate", "not-json", "edited"])
def test_damaged_root_metadata(ckpt: str, damage: str) -> None:
    root = os.path.join(ckpt, "zarr.json")
    if damage == "flip":
        flip_byte(root, os.path.getsize(root) // 2)
    elif damage == "truncate":
        truncate(root, 100)
    elif damage == "not-json":
        with open(root, "w") as f:
            f.write("not json")
    else:  # valid JSON, plausible edit: a shape changed
        with open(root) as f:
            doc = json.load(f)
        doc["attributes"]["zarrckpt"]["arrays"]["small"]["shape"] = [7]
        with open(root, "w") as f:
            json.dump(doc, f)
    assert_all_readers_fail(ckpt, "small", CorruptCheckpointError, on_open=True)


def test_deleted_root_metadata(ckpt: str) -> None:
    os.remove(os.path.join(ckpt, "zarr.json"))
    assert_all_readers_fail(ckpt, "small", CorruptCheckpointError, on_open=True)


# ----------------------------------------------------------------- array zarr.json


def _array_json(ckpt: str, fqn: str) -> str:
    return os.path.join(ckpt, array_path(fqn), "zarr.json")


@pytest.mark.parametrize(
    "damage", ["not-json", "truncated", "shape", "dtype", "chunks", "codecs", "deleted"]
)
@pytest.mark.parametrize("fqn", ["plain", "sharded"])
def test_damaged_array_metadata(ckpt: str, fqn: str, damage: str) -> None:
    path = _array_json(ckpt, fqn)
    if damage == "deleted":
        os.remove(path)
    elif damage == "not-json":
        with open(path, "w") as f:
            f.write("]]")
    elif damage == "truncated":
        truncate(path, 40)
    else:
        with open(path) as f:
            doc = json.load(f)
        if damage == "shape":
            doc["shape"][0] += 1
        elif damage == "dtype":
            doc["data_type"] = "float64"
        elif damage == "chunks":
            doc["chunk_grid"]["configuration"]["chunk_shape"][0] -= 1
        else:
            doc["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        with open(path, "w") as f:
            json.dump(doc, f)
    assert_all_readers_fail(ckpt, fqn, CorruptCheckpointError)
    # the zarr view goes through the same check
    with pytest.raises(CorruptCheckpointError):
        zarrckpt.open(ckpt)[fqn]
    # other arrays stay readable
    assert_bits_equal(_state()["small"], zarrckpt.open(ckpt).read("small"))


def test_deleted_array_directory(ckpt: str) -> None:
    shutil.rmtree(os.path.join(ckpt, array_path("sharded")))
    assert_all_readers_fail(ckpt, "sharded", CorruptCheckpointError)


# ----------------------------------------------------------------- nothing / not a checkpoint


def test_no_checkpoint_at_path(tmp_path: Any) -> None:
    missing = str(tmp_path / "nothing")
    for call in (lambda: zarrckpt.open(missing), lambda: zarrckpt.load({}, missing)):
        with pytest.raises(CheckpointNotFoundError) as info:
            call()
        assert missing in str(info.value)


def test_errors_are_zarrckpt_errors(ckpt: str) -> None:
    flip_byte(chunk_file(ckpt, "sharded", 0, 0), 3)
    with pytest.raises(ZarrCkptError):
        zarrckpt.open(ckpt).read("sharded")
    with pytest.raises(ValueError):  # CorruptCheckpointError refines ValueError
        zarrckpt.open(ckpt).read("sharded")
