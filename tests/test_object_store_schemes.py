"""Checkpoints on the other object-store schemes: ``az://`` against Azure's own
emulator (Azurite on 127.0.0.1, tests/_azure.py) and ``memory://`` (the
process's in-memory store). Round trip of every dtype, open + stats + verify +
zarr views, async_save, overwrite, a save killed before commit (az://), the
command line configured by environment variables, FSDP2 ws2 -> ws1 resharding
and plain zarr reading an az:// checkpoint; memory:// refused for several
ranks; gs:// and unknown schemes refused. The S3 versions of these tests are in
tests/test_object_store*.py; helpers are shared with them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import _object_store_cases as cases
import pytest
import torch
from conftest import DTYPES, assert_bits_equal, digest, plain_zarr_digests, random_tensor
from test_object_store import _state, _zeros_like, check_killed_save_is_invisible

import zarrckpt
from zarrckpt.errors import CheckpointExistsError, InvalidPathError
from zarrckpt.storage._object import ObjectStore
from zarrckpt.testing import run_distributed


@dataclass
class Backend:
    """A fresh empty checkpoint URL, its ``storage_options`` and client environment."""

    url: str
    options: dict[str, Any] | None
    env: dict[str, str]


@pytest.fixture(params=["az", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "az":
        server = request.getfixturevalue("azure_server")
        return Backend(request.getfixturevalue("az_url"), server.options(), server.env)
    return Backend(f"memory://{uuid.uuid4().hex[:12]}/ckpt", None, {})


def test_round_trip_every_dtype(backend):
    sd = _state()
    zarrckpt.save(sd, backend.url, storage_options=backend.options, chunk_bytes=1 << 20)
    out = _zeros_like(sd)
    zarrckpt.load(out, backend.url, storage_options=backend.options)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, out[k], k)
    assert out["meta"] == sd["meta"]
    store = ObjectStore(backend.url, backend.options)
    assert store.leftovers() == []
    assert not store.shared_files


def test_open_stats_verify_and_zarr_view(backend):
    sd = {"w": torch.randn(64, 33).bfloat16(), "b": torch.arange(10)}
    zarrckpt.save(sd, backend.url, storage_options=backend.options)
    # a sibling whose name extends the prefix: the views must not see into it
    zarrckpt.save({"b": torch.ones(3)}, backend.url + "-other", storage_options=backend.options)
    ck = zarrckpt.open(backend.url, storage_options=backend.options)
    assert sorted(ck) == ["b", "w"]
    assert_bits_equal(sd["w"], ck.read("w"))
    stats = ck.stats()
    assert stats["b"].max == 9 and stats["b"].zeros == 1
    assert_bits_equal(sd["b"], torch.from_numpy(ck.to_dask()["b"].compute()))
    assert_bits_equal(sd["b"], torch.from_numpy(ck["b"][...]))  # zarr.Array on the store
    assert_bits_equal(sd["w"], ck["w"][...])
    assert ck.verify().ok


def test_async_save(backend):
    sd = {"x": random_tensor(torch.float16, (1000, 17)), "n": {"k": 3}}
    future = zarrckpt.async_save(sd, backend.url, storage_options=backend.options)
    assert future.result(timeout=120) is None
    out = {"x": torch.zeros(1000, 17, dtype=torch.float16), "n": {"k": 0}}
    zarrckpt.load(out, backend.url, storage_options=backend.options)
    assert_bits_equal(sd["x"], out["x"])
    assert out["n"] == {"k": 3}


def test_overwrite_replaces_everything_and_refuses_without_flag(backend):
    url, opts = backend.url, backend.options
    zarrckpt.save({"old": torch.ones(100), "same": torch.ones(4)}, url, storage_options=opts)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        zarrckpt.save({"x": torch.ones(1)}, url, storage_options=opts)
    new = {"same": torch.full((4,), 2.0), "fresh": torch.arange(3)}
    zarrckpt.save(new, url, storage_options=opts, overwrite=True)
    store = ObjectStore(url, opts)
    assert store.leftovers() == []
    assert not any(k.startswith("old/") for k in store.object_keys())
    ck = zarrckpt.open(url, storage_options=opts)
    assert sorted(ck) == ["fresh", "same"]
    assert_bits_equal(new["same"], ck.read("same"))


def test_commit_marker_is_a_conditional_create(backend, monkeypatch):
    """A save that finds a marker written by another save since it started does
    not replace it (the marker PUT is a conditional create on every scheme)."""
    import obstore

    from zarrckpt.format._marker import COMMIT_MARKER
    from zarrckpt.storage import _object_staging

    real = _object_staging.ObjectStaging.commit

    def commit(self, *args, **kwargs):
        obstore.put(self.store.client, self.store.full_key(COMMIT_MARKER), b"theirs")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_object_staging.ObjectStaging, "commit", commit)
    with pytest.raises(CheckpointExistsError, match="another save committed"):
        zarrckpt.save({"a": torch.ones(3)}, backend.url, storage_options=backend.options)


def test_memory_is_shared_by_every_call_in_the_process():
    """One in-memory store per process: a checkpoint saved with one call is seen by
    open, load and the manager-style listing of its parent in later calls."""
    base = f"memory://{uuid.uuid4().hex[:12]}"
    zarrckpt.save({"a": torch.arange(3)}, f"{base}/run/step_1")
    zarrckpt.save({"a": torch.arange(3) + 1}, f"{base}/run/step_2")
    assert ObjectStore(f"{base}/run").list_dir() == ["step_1", "step_2"]
    assert zarrckpt.open(f"{base}/run/step_2").read("a").tolist() == [1, 2, 3]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_plugins_manager_and_converters(backend, tmp_path):
    """The scheme-independent entry points: dcp.save / dcp.load through the
    plug-ins, the checkpoint manager's steps and retention, and the converters
    (torch.save -> URL -> safetensors)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from zarrckpt import CheckpointManager, ZarrStorageReader, ZarrStorageWriter, convert

    url, opts = backend.url, backend.options
    sd = {"w": random_tensor(torch.bfloat16, (40, 3)), "i": torch.arange(9)}
    dcp.save(sd, storage_writer=ZarrStorageWriter(f"{url}/dcp", storage_options=opts))
    out = {"w": torch.zeros(40, 3, dtype=torch.bfloat16), "i": torch.zeros(9, dtype=torch.long)}
    dcp.load(out, storage_reader=ZarrStorageReader(f"{url}/dcp", storage_options=opts))
    assert_bits_equal(sd["w"], out["w"])
    assert_bits_equal(sd["i"], out["i"])

    manager = CheckpointManager(f"{url}/run", keep_last=2, storage_options=opts)
    for step in (1, 2, 3):
        manager.save(step, {"w": torch.full((4,), float(step))})
    manager.close()
    assert manager.all_steps() == [2, 3]
    state = {"w": torch.zeros(4)}
    assert manager.restore(state) == 3 and state["w"].tolist() == [3.0] * 4

    pt, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save(sd, pt)
    convert.convert(str(pt), f"{url}/conv", storage_options=opts)
    convert.convert(f"{url}/conv", str(st), storage_options=opts)
    back = load_file(str(st))
    assert_bits_equal(sd["w"], back["w"])
    assert_bits_equal(sd["i"], back["i"])


# ----------------------------------------------------------------- az:// only


def test_az_large_piece_uses_multipart_and_round_trips(azure_server, az_url):
    """A piece above the multipart threshold (16 MiB) goes up in blocks."""
    big = random_tensor(torch.float32, (4_500_000,), seed=3)  # 18 MB, one chunk
    opts = azure_server.options()
    zarrckpt.save({"big": big}, az_url, storage_options=opts, chunk_bytes=32 << 20)
    sizes = [ObjectStore(az_url, opts).size(k) for k in ObjectStore(az_url, opts).object_keys()]
    assert max(sizes) >= 16 << 20
    out = {"big": torch.zeros_like(big)}
    zarrckpt.load(out, az_url, storage_options=opts)
    assert_bits_equal(big, out["big"])


def test_az_save_killed_before_the_marker_is_invisible(azure_server, az_url):
    check_killed_save_is_invisible(az_url, azure_server.options(), azure_server.env)


def test_az_cli_configured_by_environment(azure_server, az_url):
    zarrckpt.save(
        {"w": torch.ones(4, 3), "b": torch.arange(5)}, az_url,
        storage_options=azure_server.options(),
    )
    env = {**os.environ, **azure_server.env}
    for k in [k for k in env if k.startswith("AWS_")]:
        del env[k]
    outs = {}
    for cmd in ("ls", "info", "verify"):
        proc = subprocess.run(
            [sys.executable, "-m", "zarrckpt", cmd, az_url],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        outs[cmd] = proc.stdout
    assert "w" in outs["ls"] and "[4,3]" in outs["ls"]
    assert "tensors:" in outs["info"]
    assert outs["verify"].startswith("OK") and az_url in outs["verify"]


def test_az_connection_string_option_and_environment(azure_server, az_url, monkeypatch):
    """adlfs's spelling: a connection string in storage_options, or in
    AZURE_STORAGE_CONNECTION_STRING when nothing else names the account."""
    conn = azure_server.connection_string
    zarrckpt.save({"a": torch.arange(4)}, az_url, storage_options={"connection_string": conn})
    for k in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
    out = {"a": torch.zeros(4, dtype=torch.long)}
    zarrckpt.load(out, az_url.replace("az://", "azure://"))
    assert out["a"].tolist() == [0, 1, 2, 3]


def test_abfs_url_names_the_account(azure_server, az_url):
    """``abfs://container@account.dfs.core.windows.net/prefix``: the account comes
    from the URL; the same checkpoint is read back through its az:// URL."""
    from _azure import ACCOUNT

    container, prefix = az_url[len("az://"):].split("/", 1)
    url = f"abfs://{container}@{ACCOUNT}.dfs.core.windows.net/{prefix}"
    opts = azure_server.options()
    del opts["account_name"]
    zarrckpt.save({"a": torch.arange(5)}, url, storage_options=opts)
    assert zarrckpt.open(az_url, storage_options=azure_server.options()).read("a").tolist() == [
        0, 1, 2, 3, 4
    ]


@pytest.mark.slow
def test_az_reshard_fsdp2_ws2_to_one_process(azure_server, az_url, tmp_path):
    opts, ref = azure_server.options(), str(tmp_path / "fsdp2.pt")
    run_distributed(cases.save_layout, 2, az_url, opts, "fsdp2_ws2", ref)
    single = cases.load_layout(0, 1, az_url, opts, "single", ref)
    assert single["compared"] > 0
    assert single["mismatched"] == [], single


#: plain zarr-python on obstore's AzureStore (``target``: container, prefix, account, key,
#: endpoint)
_OPEN_AZURE = """
from obstore.store import AzureStore
container, prefix, account, key, endpoint = target
client = AzureStore(container, prefix=prefix, account_name=account, access_key=key,
                    endpoint=endpoint, client_options={"allow_http": True})
group = zarr.open_group(zarr.storage.ObjectStore(client, read_only=True), mode="r")
"""


@pytest.mark.slow
def test_plain_zarr_reads_every_array_from_az(azure_server, az_url):
    from _azure import ACCOUNT, KEY

    sd = {f"t{i}": random_tensor(d, (9, 4), seed=i) for i, d in enumerate(DTYPES)}
    zarrckpt.save(sd, az_url, storage_options=azure_server.options())
    container, prefix = az_url[len("az://"):].split("/", 1)
    out = plain_zarr_digests(  # asserts that neither zarrckpt nor torch was imported
        [container, prefix, ACCOUNT, KEY, azure_server.endpoint],
        sorted(sd),
        open_group=_OPEN_AZURE,
    )
    for k, v in sd.items():
        assert out[k][1:] == (digest(v)[1], digest(v)[2]), k


# ----------------------------------------------------------------- refusals


def test_memory_refused_for_several_ranks():
    """Each rank's memory:// store is its own: save, async_save, load and the DCP
    plug-ins on 2 ranks raise InvalidPathError on every rank before anything is
    written."""
    from _scheme_cases import memory_refused

    results = run_distributed(memory_refused, 2, "memory://shared/ckpt")
    for result in results:
        assert result["keys"] == []
        assert len(result["errors"]) == 5
        for name, error in result["errors"].items():
            assert error is not None and "2 processes" in error, (name, error)


@pytest.mark.parametrize(
    ("path", "options", "match"),
    [
        ("gs://bucket/x", None, r"gs://\) is not supported yet.*no loopback GCS server"),
        ("gcs://bucket/x", None, "not supported yet"),
        ("hdfs://host/x", None, r"scheme hdfs://, which zarrckpt does not support"),
        ("az://", None, r"names no bucket \(az://container/prefix\)"),
        ("memory://", None, "names no path"),
        ("memory:///", None, "names no path"),
        ("memory://m/x", {"endpoint": "http://127.0.0.1:1"}, "takes none"),
        ("az://c/x", {"no_such_option": 1}, "cannot use storage_options"),
        ("az://c/x", {"connection_string": "AccountName"}, "without '='"),
        ("az://c/x", {"max_retries": -1}, "max_retries"),
    ],
)
def test_invalid_urls_and_options(path, options, match):
    with pytest.raises(InvalidPathError, match=match):
        zarrckpt.load({}, path, storage_options=options)
    with pytest.raises(InvalidPathError, match=match):
        zarrckpt.save({"a": torch.ones(1)}, path, storage_options=options)


def test_missing_azurite_fails_on_ci(tmp_path, monkeypatch):
    """On CI the Azure tests fail (never skip, never install) without Azurite."""
    import _azure

    monkeypatch.setattr(_azure, "AZURITE_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="run `make install`"):
        _azure.azurite_blob()


def test_makefile_installs_the_azurite_the_tests_pin():
    from _azure import AZURITE_VERSION

    with open(os.path.join(os.path.dirname(__file__), "..", "Makefile")) as f:
        makefile = f.read()
    assert re.search(rf"^AZURITE_VERSION\s*:?=\s*{re.escape(AZURITE_VERSION)}$", makefile, re.M)
    assert "azurite@$(AZURITE_VERSION)" in makefile
