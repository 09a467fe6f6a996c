"""safetensors and torch.save files on an object store as sources of
``zarrckpt.load`` and of ``convert.from_safetensors``: a safetensors object is
read by ranged GETs (the header, then the rows each rank needs; no local copy),
a torch.save object through a local copy deleted as soon as it is mapped.
Everything bit-exact against the saved tensors."""

from __future__ import annotations

import os
import threading

import _remote_file_cases as cases
import pytest
import torch
from _convert_cases import SimpleModelUneven
from _s3 import FaultProxy
from conftest import DTYPES, assert_bits_equal, random_tensor

import zarrckpt
from zarrckpt import convert
from zarrckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from zarrckpt.interop._safetensors_remote import Prefetcher, RemoteSafetensorsReader
from zarrckpt.storage._remote_files import upload
from zarrckpt.testing import run_distributed

_SAFETENSORS_DTYPES = [d for d in DTYPES if d not in (torch.complex128,)]


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint.removeprefix("http://"))
    yield p
    p.close()


def _put_file(s3_server, local: str, url: str) -> None:
    upload(local, url, s3_server.options(), overwrite=True)


def _temp_entries(prefix: str) -> set[str]:
    import tempfile

    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(prefix)}


def test_load_a_safetensors_object_by_ranged_gets(s3_server, s3_url, tmp_path, proxy):
    from safetensors.torch import save_file

    sd = {
        f"t_{i}": random_tensor(dtype, (33, 5), seed=i)
        for i, dtype in enumerate(_SAFETENSORS_DTYPES)
        if dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool,
                     torch.uint8, torch.float8_e4m3fn)
    }
    sd["scalar"] = torch.tensor(2.5)
    save_file(sd, str(tmp_path / "m.safetensors"))
    url = f"{s3_url}/m.safetensors"
    _put_file(s3_server, str(tmp_path / "m.safetensors"), url)
    opts = s3_server.options(endpoint=proxy.endpoint)
    before = _temp_entries("zarrckpt-")
    proxy.reset_counts()
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    stats: dict[str, int] = {}
    zarrckpt.load(target, url, storage_options=opts, stats=stats)
    for k, v in sd.items():
        assert_bits_equal(v, target[k], k)
    assert _temp_entries("zarrckpt-") == before  # no local copy
    on_object = [m for m, p in proxy.log if p.endswith("/m.safetensors")]
    # a HEAD (what the URL names), a GET of its first bytes (torch.save or
    # safetensors?), one of the header, one per tensor: no GET of the whole file
    assert on_object.count("GET") == len(sd) + 2, proxy.log
    assert on_object.count("HEAD") <= 1, proxy.log
    assert stats["bytes_read"] == sum(v.numel() * v.element_size() for v in sd.values())



def test_load_nesting_and_complex128_written_by_to_safetensors(s3_server, s3_url, tmp_path):
    opts = s3_server.options()
    state = {
        "model": {"w": torch.randn(6, 4), "b": torch.randn(4).bfloat16()},
        "z": torch.randn(3, 2, dtype=torch.complex128),
        "z0": torch.tensor(1 + 2j, dtype=torch.complex128),
        "step": 7,
        "names": ["a", "b"],
    }
    zarrckpt.save(state, str(tmp_path / "ckpt"))
    url = f"{s3_url}/state.safetensors"
    convert.to_safetensors(str(tmp_path / "ckpt"), url, storage_options=opts)
    target = {
        "model": {"w": torch.zeros(6, 4), "b": torch.zeros(4).bfloat16()},
        "z": torch.zeros(3, 2, dtype=torch.complex128),
        "z0": torch.tensor(0j, dtype=torch.complex128),
        "step": 0,
        "names": [],
    }
    zarrckpt.load(target, url, storage_options=opts)
    assert_bits_equal(state["model"]["w"], target["model"]["w"])
    assert_bits_equal(state["model"]["b"], target["model"]["b"])
    assert_bits_equal(state["z"], target["z"])
    assert_bits_equal(state["z0"], target["z0"])
    assert target["step"] == 7 and target["names"] == ["a", "b"]
    # and through a zarr checkpoint on the same store, converted without a local copy
    before = _temp_entries("zarrckpt-convert-")
    convert.from_safetensors(url, f"{s3_url}/back", storage_options=opts)
    assert _temp_entries("zarrckpt-convert-") == before
    back = zarrckpt.open(f"{s3_url}/back", storage_options=opts)
    assert_bits_equal(state["z"], back.read("z"))
    assert_bits_equal(state["model"]["b"], back.read("model.b"))


def test_load_a_torch_save_object(s3_server, s3_url, tmp_path):
    opts = s3_server.options()
    model = SimpleModelUneven(seed=3)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    url = f"{s3_url}/m.pt"
    _put_file(s3_server, str(tmp_path / "m.pt"), url)
    before = _temp_entries("zarrckpt-load-")
    other = SimpleModelUneven(seed=4)
    zarrckpt.load(other, url, storage_options=opts)
    for k, v in model.state_dict().items():
        assert_bits_equal(v, other.state_dict()[k], k)
    assert _temp_entries("zarrckpt-load-") == before  # the copy is gone once mapped


def test_load_of_an_object_that_is_no_checkpoint_names_it(s3_server, s3_url, tmp_path):
    opts = s3_server.options()
    (tmp_path / "notes.txt").write_bytes(b"hello, not a tensor file")
    url = f"{s3_url}/notes.txt"
    _put_file(s3_server, str(tmp_path / "notes.txt"), url)
    with pytest.raises(CorruptCheckpointError, match="neither a torch.save file nor") as info:
        zarrckpt.load({"w": torch.zeros(1)}, url, storage_options=opts)
    assert url in str(info.value)
    with pytest.raises(CheckpointNotFoundError):
        zarrckpt.load({"w": torch.zeros(1)}, f"{s3_url}/missing.safetensors",
                      storage_options=opts)


@pytest.mark.parametrize("wrap", ["fsdp2", "tp"])
def test_sharded_model_loads_only_its_rows(s3_server, s3_url, tmp_path, wrap):
    from safetensors.torch import save_file

    sd = SimpleModelUneven(seed=0).state_dict()
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "ref.pt")
    url = f"{s3_url}/m.safetensors"
    _put_file(s3_server, str(tmp_path / "m.safetensors"), url)
    results = run_distributed(
        cases.load_into_sharded, 2, url, s3_server.options(), wrap, str(tmp_path / "ref.pt")
    )
    for rank, r in enumerate(results):
        assert r["mismatched"] == [], (rank, r)
        if wrap == "fsdp2":  # row shards: each rank reads its rows, not the file
            assert 0 < r["bytes_read"] < r["total"], (rank, r)


def test_prefetcher_bounds_what_it_holds_and_takes_any_order(s3_server, s3_url, tmp_path):
    from safetensors.torch import save_file

    sd = {f"t{i}": torch.full((256,), float(i)) for i in range(12)}  # 1 KiB each
    save_file(sd, str(tmp_path / "m.safetensors"))
    url = f"{s3_url}/m.safetensors"
    _put_file(s3_server, str(tmp_path / "m.safetensors"), url)
    from zarrckpt.storage._object_config import ObjectPath

    with RemoteSafetensorsReader(ObjectPath(url, s3_server.options())) as reader:
        entries = list(reader.entries.values())
        held: list[int] = []
        real_rows = reader.rows
        lock = threading.Lock()
        started: list[Prefetcher] = []  # its threads start before the constructor returns

        def rows(e, a, b):
            out = real_rows(e, a, b)
            with lock:
                if started:
                    held.append(started[0]._held)
            return out

        reader.rows = rows  # type: ignore[method-assign]
        prefetch = Prefetcher(reader, entries, threads=3, window=3 * 1024)
        with lock:
            started.append(prefetch)
            held.append(prefetch._held)
        try:
            order = entries[5:] + entries[:5]  # out of file order
            for e in order:
                assert torch.equal(torch.from_numpy(prefetch.take(e)), sd[e.name])
        finally:
            prefetch.close()
        assert max(held) <= 3 * 1024  # never more than the window read ahead


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_an_object_replaced_while_read_is_refused_not_mixed(s3_server, s3_url, tmp_path, where):
    """The header of one version and the tensors of another are never combined:
    every GET after the first asks for the first one's version (If-Match)."""
    from safetensors.torch import save_file

    from zarrckpt.errors import IncompleteCheckpointError
    from zarrckpt.storage._object_config import ObjectPath

    save_file({"w": torch.zeros(64, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(64, 4)}, str(tmp_path / "b.safetensors"))  # same layout
    if where == "s3":
        url, opts = f"{s3_url}/m.safetensors", s3_server.options()
    else:
        url, opts = f"memory://{os.urandom(6).hex()}/m.safetensors", None
    upload(str(tmp_path / "a.safetensors"), url, opts, overwrite=True)
    with RemoteSafetensorsReader(ObjectPath(url, opts)) as reader:
        entry = reader.entries["w"]
        upload(str(tmp_path / "b.safetensors"), url, opts, overwrite=True)
        with pytest.raises(IncompleteCheckpointError, match="replaced or deleted"):
            reader.rows(entry, 0, 64)


def test_a_damaged_torch_save_object_is_named_by_its_url(s3_server, s3_url, tmp_path):
    opts = s3_server.options()
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    url = f"{s3_url}/bad.pt"
    _put_file(s3_server, str(tmp_path / "bad.pt"), url)
    with pytest.raises(CorruptCheckpointError) as info:
        zarrckpt.load({"w": torch.zeros(1)}, url, storage_options=opts)
    assert url in str(info.value) and "zarrckpt-load-" not in str(info.value)


def test_from_safetensors_checks_the_destination_before_reading_ahead(
    s3_server, s3_url, tmp_path, proxy
):
    from safetensors.torch import save_file

    from zarrckpt.errors import CheckpointExistsError

    save_file({f"t{i}": torch.randn(1000) for i in range(8)}, str(tmp_path / "m.safetensors"))
    url = f"{s3_url}/m.safetensors"
    _put_file(s3_server, str(tmp_path / "m.safetensors"), url)
    opts = s3_server.options(endpoint=proxy.endpoint)
    zarrckpt.save({"x": torch.ones(1)}, f"{s3_url}/ckpt", storage_options=opts)
    proxy.reset_counts()
    with pytest.raises(CheckpointExistsError):
        convert.from_safetensors(url, f"{s3_url}/ckpt", storage_options=opts)
    assert not [p for m, p in proxy.log if p.endswith("/m.safetensors")], proxy.log
