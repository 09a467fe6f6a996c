"""Format 3: one shard file per tensor written by every rank in place, files
independent of the world size, chunks bound to their place, older formats readable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import _format_v3_cases as cases
import numpy as np
import pytest
import torch
from conftest import assert_bits_equal

import zarrckpt
from zarrckpt import convert
from zarrckpt.errors import CorruptCheckpointError
from zarrckpt.format._dtypes import info_for_zarr
from zarrckpt.format._layout import ArrayLayout, choose_layout
from zarrckpt.format._metadata import ArrayEntry, parse_entry
from zarrckpt.format._shard import PAGE_BYTES, plan_storage, storage_positions
from zarrckpt.inspect import verify
from zarrckpt.testing import run_distributed

V2_CHECKPOINT = os.path.join(os.path.dirname(__file__), "data", "checkpoint-v2")


def _files(path: str | Path) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(path):
        out += [os.path.relpath(os.path.join(dirpath, n), path) for n in names]
    return sorted(out)


# ------------------------------------------------------------------ planning (pure)


def test_shard_plan_aligns_pieces_of_different_writers_to_pages() -> None:
    pieces = choose_layout((10, 6), 4, chunk_shape=(3, 6))  # 4 pieces: 3, 3, 3, 1 rows
    writers = {(0, 0): 0, (1, 0): 1, (2, 0): 2, (3, 0): 3}
    stored = plan_storage(pieces, writers)
    assert stored.mode == "shard" and stored.layout.chunk_shape == (12, 6)
    assert stored.layout.inner_shape == (3, 6) and stored.layout.separator == "."
    offsets = [stored.offsets[p] for p in sorted(stored.offsets)]
    # the index (rank 0's) first, rank 0's piece right after it, then a page per writer
    assert offsets == [stored.layout.index_nbytes, PAGE_BYTES, 2 * PAGE_BYTES, 3 * PAGE_BYTES]
    assert stored.index_writer == 0
    # one writer: packed right after the index, no gaps
    packed = plan_storage(pieces, dict.fromkeys(writers, 5))
    assert [packed.offsets[p] for p in sorted(packed.offsets)] == [
        packed.layout.index_nbytes + k * (3 * 6 * 4 + 4) for k in range(4)
    ]
    # pieces of one writer back to back, a new page where the writer changes
    two = plan_storage(pieces, {(0, 0): 0, (1, 0): 0, (2, 0): 1, (3, 0): 1})
    got = [two.offsets[p] for p in sorted(two.offsets)]
    assert got == [36 + 16 * 2, 36 + 16 * 2 + 76, PAGE_BYTES, PAGE_BYTES + 76]


def test_shard_index_matches_the_offsets_and_every_position_is_planned() -> None:
    pieces = ArrayLayout((10, 8), (4, 8), (2, 8), 2)  # 3 pieces, each 2 inner chunks
    stored = plan_storage(pieces, {(0, 0): 1, (1, 0): 0, (2, 0): 1})
    raw = stored.index_bytes()
    table = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
    assert len(table) == 5  # the shard (10 rows -> 10) holds 5 inner chunks
    assert storage_positions(stored) == [0, 1, 2, 3, 4]
    for piece, offset in stored.offsets.items():
        target = stored.target(piece)
        assert target.offset == offset
        for k, position in enumerate(target.positions):
            assert table[position][0] == offset + k * (2 * 8 * 2 + 4)
    assert stored.shard_size == max(int(a + b) for a, b in table)


def test_small_tensors_are_one_plain_file_and_object_stores_one_per_piece() -> None:
    one = plan_storage(choose_layout((7,), 4))
    assert one.mode == "plain" and one.layout.inner_shape is None
    assert one.target((0,)).key == "c.0" and one.target((0,)).offset is None
    pieces = choose_layout((10, 6), 4, chunk_shape=(3, 6))
    remote = plan_storage(pieces, None, shared_files=False)
    assert remote.mode == "pieces" and remote.target((2, 0)).key == "c.2.0"


def test_small_tensor_files_and_directories(tmp_path: Path) -> None:
    """An unsharded tensor is its directory, its zarr.json and one data file."""
    zarrckpt.save({"a": torch.arange(3.0), "b": torch.ones(2, 2)}, tmp_path / "c", fsync=False)
    assert _files(tmp_path / "c") == [
        "a/c.0", "a/zarr.json", "b/c.0.0", "b/zarr.json", "zarr.json", "~commit/zarr.json"
    ]


# ------------------------------------------------------------------ 4 ranks, plain readers


@pytest.fixture(scope="module")
def fsdp2_ws4(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Any]]:
    path = str(tmp_path_factory.mktemp("v3") / "ws4")
    return path, run_distributed(cases.save_fsdp2_mixed, 4, path)


def test_fsdp2_ws4_shards_are_uneven_and_one_file_per_tensor(
    fsdp2_ws4: tuple[str, list[Any]],
) -> None:
    path, local = fsdp2_ws4
    assert [r["0.weight"][0] for r in local] == [3, 3, 3, 1]
    assert [r["fp8"][0] for r in local] == [4, 4, 4, 1]
    expected = cases.expected_state()
    data_files = [f for f in _files(path) if not f.endswith("zarr.json")]
    assert sorted(data_files) == sorted(f"{k}/c.0" if t.dim() == 1 else f"{k}/c.0.0"
                                        for k, t in expected.items())
    for fqn, tensor in expected.items():
        assert_bits_equal(tensor, zarrckpt.open(path).read(fqn))
    assert verify(path).ok


_ZARR_READER = """
import json, sys, numpy as np, zarr
group = zarr.open_group(sys.argv[1], mode="r")
out = {}
for name, array in group.arrays():
    data = array[...]
    out[name] = [str(data.dtype), list(data.shape), data.view(np.uint8).tobytes().hex()]
print(json.dumps(out))
"""

_TENSORSTORE_READER = """
import json, sys, numpy as np, tensorstore as ts
out = {}
for name in sys.argv[2:]:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": sys.argv[1] + "/" + name}}
    data = ts.open(spec, open=True, read=True).result().read().result()
    out[name] = [str(data.dtype), list(data.shape), data.view(np.uint8).tobytes().hex()]
print(json.dumps(out))
"""


def _raw(t: torch.Tensor) -> tuple[list[int], str]:
    return list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes().hex()


@pytest.mark.parametrize("reader", ["zarr", "tensorstore"])
def test_fsdp2_ws4_reads_bit_exact_in_plain_zarr_and_tensorstore(
    fsdp2_ws4: tuple[str, list[Any]], reader: str
) -> None:
    """A fresh interpreter with zarr-python (consolidated metadata, one document) or
    tensorstore (per-array zarr.json) reads every array bit-exact."""
    path, _ = fsdp2_ws4
    expected = cases.expected_state()
    args = [sys.executable, "-c", _ZARR_READER if reader == "zarr" else _TENSORSTORE_READER, path]
    if reader == "tensorstore":
        args += list(expected)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert set(got) == set(expected)
    for fqn, tensor in expected.items():
        dtype, shape, data = got[fqn]
        assert dtype == str(tensor.dtype).removeprefix("torch."), fqn
        assert (shape, data) == _raw(tensor), fqn


def test_root_carries_consolidated_metadata(fsdp2_ws4: tuple[str, list[Any]]) -> None:
    path, _ = fsdp2_ws4
    with open(os.path.join(path, "zarr.json")) as f:
        root = json.load(f)
    listed = root["consolidated_metadata"]["metadata"]
    for fqn in cases.expected_state():
        with open(os.path.join(path, fqn, "zarr.json")) as f:
            assert listed[fqn] == json.load(f)


def test_files_do_not_grow_with_the_world_size(tmp_path: Path) -> None:
    counts = {}
    for ws in (1, 2, 4):
        path = str(tmp_path / f"ws{ws}")
        run_distributed(cases.save_same_model, ws, path)
        counts[ws] = len(_files(path))
    assert counts[1] == counts[2] == counts[4], counts


# ------------------------------------------------------------------ binding


def _two_layer_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"l0.w": torch.randn(64, 16, generator=g), "l1.w": torch.randn(64, 16, generator=g)}


def _readers(path: str) -> dict[str, Any]:
    return {
        "load": lambda: zarrckpt.load({"l0.w": torch.zeros(64, 16), "l1.w": torch.zeros(64, 16)},
                                      path),
        "open().read": lambda: zarrckpt.open(path).read("l0.w"),
        "open()[...]": lambda: zarrckpt.open(path)["l0.w"][...],
        "dask": lambda: zarrckpt.open(path).to_dask()["l0.w"].compute(),
    }


def _assert_reported(path: str) -> None:
    for name, read in _readers(path).items():
        with pytest.raises(CorruptCheckpointError, match="does not record|swapped") as info:
            read()
        assert path in str(info.value) and "l0.w" in str(info.value), name
    report = verify(path)
    assert not report.ok and "checksum" in report.kinds()
    assert any(p.key == "l0.w" for p in report.problems)


@pytest.mark.parametrize("layout", ["shard", "pieces"])
def test_swapped_files_between_tensors_are_reported(tmp_path: Path, layout: str) -> None:
    path = str(tmp_path / "c")
    zarrckpt.save(_two_layer_state(0), path, fsync=False, chunk_bytes=1024, inner_chunk_bytes=256,
                  file_layout=layout)
    a, b = (os.path.join(path, k) for k in ("l0.w", "l1.w"))
    names = [n for n in os.listdir(a) if n.startswith("c")]
    for name in names:  # swap every data file of the two tensors
        os.rename(os.path.join(a, name), os.path.join(a, name + ".tmp"))
        os.rename(os.path.join(b, name), os.path.join(a, name))
        os.rename(os.path.join(a, name + ".tmp"), os.path.join(b, name))
    _assert_reported(path)


def test_swapped_chunk_files_within_a_tensor_are_reported(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    zarrckpt.save(_two_layer_state(0), path, fsync=False, chunk_bytes=1024, file_layout="pieces")
    first, second = (os.path.join(path, "l0.w", f"c.{i}.0") for i in (0, 1))
    assert os.path.getsize(first) == os.path.getsize(second)
    os.rename(first, first + ".tmp")
    os.rename(second, first)
    os.rename(first + ".tmp", second)
    _assert_reported(path)


@pytest.mark.parametrize("layout", ["shard", "pieces"])
def test_chunk_file_copied_from_another_checkpoint_is_reported(
    tmp_path: Path, layout: str
) -> None:
    """Another checkpoint of the same model (same shapes and layout, other values)."""
    path, other = str(tmp_path / "c"), str(tmp_path / "other")
    options = {"fsync": False, "chunk_bytes": 1024, "inner_chunk_bytes": 256,
               "file_layout": layout}
    zarrckpt.save(_two_layer_state(0), path, **options)
    zarrckpt.save(_two_layer_state(1), other, **options)
    name = sorted(n for n in os.listdir(os.path.join(path, "l0.w")) if n.startswith("c"))[0]
    shutil.copy(os.path.join(other, "l0.w", name), os.path.join(path, "l0.w", name))
    _assert_reported(path)


def test_identical_bytes_from_elsewhere_are_not_a_difference(tmp_path: Path) -> None:
    """Binding is by content: a file holding exactly the recorded bytes loads."""
    path, other = str(tmp_path / "c"), str(tmp_path / "other")
    zarrckpt.save(_two_layer_state(0), path, fsync=False)
    zarrckpt.save(_two_layer_state(0), other, fsync=False)
    shutil.copy(os.path.join(other, "l0.w", "c.0.0"), os.path.join(path, "l0.w", "c.0.0"))
    assert_bits_equal(_two_layer_state(0)["l0.w"], zarrckpt.open(path).read("l0.w"))


@pytest.mark.parametrize("text", ["AAAA", "A" * 10_000, 5, "!!!!" * 86])
def test_crc_table_of_the_wrong_size_or_form_is_refused(text: Any) -> None:
    record = ArrayEntry(
        "w", "w", info_for_zarr("float32"), plan_storage(choose_layout((64, 16), 4)).layout,
        crcs=b"\0" * 4,
    ).manifest_entry()
    assert parse_entry("w", record, checkpoint="ck").crcs == b"\0" * 4
    record["crc32c"] = text
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        parse_entry("w", record, checkpoint="ck")


# ------------------------------------------------------------------ format 2 stays readable


def _v2_expected() -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    return {
        "model.w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "model.big": torch.randn(40, 8, generator=g).to(torch.bfloat16),
        "count": torch.tensor(5),
    }


def test_v2_checkpoint_written_by_zarrckpt_before_format_3(tmp_path: Path) -> None:
    """tests/data/checkpoint-v2 was written by the previous release (nested chunk keys,
    shard index at the end, no crc table): load, open, dask, verify and convert read it."""
    path = str(tmp_path / "v2")
    shutil.copytree(V2_CHECKPOINT, path)
    ckpt = zarrckpt.open(path)
    assert ckpt.info().format_version == 2
    expected = _v2_expected()
    for fqn, tensor in expected.items():
        assert_bits_equal(tensor, ckpt.read(fqn))
        np.testing.assert_array_equal(
            ckpt.to_dask()[fqn].compute().reshape(-1).view(np.uint8),
            tensor.contiguous().reshape(-1).view(torch.uint8).numpy(),
        )
    target: dict[str, Any] = {
        "model": {"w": torch.zeros(3, 4), "big": torch.zeros(40, 8, dtype=torch.bfloat16)},
        "count": torch.tensor(0), "blob": b"", "step": 0,
    }
    zarrckpt.load(target, path)
    assert_bits_equal(expected["model.big"], target["model"]["big"])
    assert target["blob"] == b"x" * 5000 and target["step"] == 9
    assert verify(path).ok
    out = str(tmp_path / "v2.pt")
    convert.to_torch_save(path, out)
    assert_bits_equal(expected["model.big"], torch.load(out)["model"]["big"])
    back = str(tmp_path / "v3")
    convert.from_torch_save(out, back)  # written as format 3
    assert zarrckpt.open(back).info().format_version == 3
    assert_bits_equal(expected["model.big"], zarrckpt.open(back).read("model.big"))
    # a damaged format-2 chunk is still caught by its own checksum
    chunk = os.path.join(path, "model.big", "c", "1", "0")
    data = bytearray(open(chunk, "rb").read())  # noqa: SIM115
    data[2] ^= 1
    with open(chunk, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="model.big"):
        zarrckpt.open(path).read("model.big")


def test_verify_lists_the_staging_of_a_dead_save(tmp_path: Path) -> None:
    """A staging left beside the checkpoint by a save whose process is gone is listed
    (not a problem of the checkpoint) and removed by the next save."""
    path = str(tmp_path / "c")
    zarrckpt.save({"w": torch.ones(2)}, path, fsync=False)
    code = (
        "import sys; from zarrckpt.storage._local import open_store; "
        "print(open_store(sys.argv[1]).stage().token)"  # a save whose process then ends
    )
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True)
    staging = proc.stdout.strip()
    assert proc.returncode == 0 and os.path.isdir(staging), proc.stderr
    report = verify(path)
    assert report.ok and staging in report.leftovers, report
    assert "dead save" in str(report)
    zarrckpt.save({"w": torch.zeros(2)}, path, fsync=False, overwrite=True)
    assert verify(path).leftovers == [] and not os.path.exists(staging)


@pytest.mark.parametrize("layout", ["shard", "pieces"])
def test_zarr_view_never_mixes_an_overwritten_checkpoint(tmp_path: Path, layout: str) -> None:
    """A zarr view opened before an overwrite=True save reads the new files by path:
    their chunks are not the ones its manifest records, so the read raises."""
    path = str(tmp_path / "c")
    options = {"fsync": False, "chunk_bytes": 1024, "inner_chunk_bytes": 256,
               "file_layout": layout}
    zarrckpt.save(_two_layer_state(0), path, **options)
    view = zarrckpt.open(path)["l0.w"]
    assert_bits_equal(_two_layer_state(0)["l0.w"], torch.from_numpy(view[...]))
    zarrckpt.save(_two_layer_state(1), path, overwrite=True, **options)
    with pytest.raises(CorruptCheckpointError, match="does not record"):
        view[...]
    fresh = zarrckpt.open(path)["l0.w"][...]
    assert_bits_equal(_two_layer_state(1)["l0.w"], torch.from_numpy(fresh))


def test_format_3_record_without_its_crc_table_is_refused(tmp_path: Path) -> None:
    """A root rewritten without the crc tables (commit marker fixed up to match) must
    not silently turn the binding check off: the records are refused."""
    from zarrckpt.format._codec import crc32c

    path = str(tmp_path / "c")
    zarrckpt.save(_two_layer_state(0), path, fsync=False)
    root = os.path.join(path, "zarr.json")
    with open(root) as f:
        doc = json.load(f)
    for record in doc["attributes"]["zarrckpt"]["arrays"].values():
        del record["crc32c"]
    data = json.dumps(doc).encode()
    with open(root, "wb") as f:
        f.write(data)
    marker_path = os.path.join(path, "~commit", "zarr.json")
    with open(marker_path) as f:
        marker = json.load(f)
    marker["attributes"]["zarrckpt_commit"]["root_metadata_crc32c"] = crc32c(data)
    with open(marker_path, "w") as f:
        json.dump(marker, f)
    shutil.copy(os.path.join(path, "l0.w", "c.0.0"), os.path.join(path, "l1.w", "c.0.0"))
    with pytest.raises(CorruptCheckpointError, match="crc32c table"):
        zarrckpt.load({"l0.w": torch.zeros(64, 16), "l1.w": torch.zeros(64, 16)}, path)
    report = verify(path)
    assert not report.ok and any("crc32c table" in p.message for p in report.problems)


@pytest.mark.parametrize("rows", [(16, 40), (16, 37), (88, 96), (5, 30), (0, 96), (95, 96)])
def test_partial_row_reads_of_a_shard_file(tmp_path: Path, rows: tuple[int, int]) -> None:
    """Rows of a shard file of row-slab inner chunks (what a rank of another mesh reads):
    aligned runs go straight into the destination, cut ends through a scratch buffer."""
    from zarrckpt.parallel._reader import CheckpointFiles, ReadRequest

    source = torch.arange(96 * 8, dtype=torch.float32).reshape(96, 8)
    path = str(tmp_path / "c")
    zarrckpt.save({"w": source}, path, fsync=False, inner_chunk_bytes=8 * 8 * 4)
    files = CheckpointFiles(path)
    entry = files.arrays["w"]
    assert entry.layout.inner_shape == (8, 8) and entry.layout.chunk_shape == (96, 8)
    start, stop = rows
    dest = np.full((stop - start, 8), -1.0, dtype=np.float32)
    read = files.read_into(ReadRequest(entry, dest, (start, 0)))
    np.testing.assert_array_equal(dest, source[start:stop].numpy())
    needed_inner = -(-stop // 8) - start // 8
    assert read <= entry.layout.index_nbytes + needed_inner * (8 * 8 * 4 + 4)


def test_unknown_file_layout_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from zarrckpt.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="file_layout='files'.*'auto', 'shard'"):
        zarrckpt.save({"w": torch.ones(2)}, tmp_path / "c", file_layout="files")
    with pytest.raises(InvalidArgumentError, match="file_layout"):
        zarrckpt.async_save({"w": torch.ones(2)}, tmp_path / "c", file_layout="")
    assert list(tmp_path.iterdir()) == []
