"""Object-store edge cases found in review: an overwrite never deletes objects that
are not the checkpoint's, URL keys with empty / ``.`` / ``..`` components are
refused, a failed ranged GET is never taken for the end of a chunk, a load stops
at its first failed read, the account an Azure URL names wins over the
environment's, and DCP directories on object stores are neither mixed from two
versions when downloaded nor mixed with another writer's files when uploaded."""

from __future__ import annotations

import os
import tempfile

import obstore
import pytest
import torch
import torch.distributed.checkpoint as dcp
from _s3 import FaultProxy
from conftest import assert_bits_equal

import zarrckpt
from zarrckpt.errors import (
    CheckpointExistsError,
    IncompleteCheckpointError,
    InvalidPathError,
    ObjectStoreError,
)
from zarrckpt.storage import _object
from zarrckpt.storage import _remote_files as remote
from zarrckpt.storage._object import ObjectStore
from zarrckpt.storage._object_config import build_client


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint.removeprefix("http://"))
    yield p
    p.close()


def _dcp_dir(value: float) -> str:
    d = tempfile.mkdtemp()
    dcp.save(
        {"w": torch.full((4,), value), "v": torch.full((3,), value)},
        storage_writer=dcp.FileSystemWriter(d, thread_count=1),
        no_dist=True,
    )
    return d


def _dcp_load(url: str, options) -> torch.Tensor:
    out = tempfile.mkdtemp()
    remote.download_prefix(url, options, out)
    sd = {"w": torch.zeros(4), "v": torch.zeros(3)}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(out), no_dist=True)
    return sd["w"]


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_overwrite_refuses_objects_beside_the_checkpoint(s3_server, s3_url, where):
    if where == "s3":
        url, opts = s3_url, s3_server.options()
    else:
        url, opts = f"memory://{os.urandom(6).hex()}/ck", None
    zarrckpt.save({"w": torch.ones(3)}, url, storage_options=opts)
    store = ObjectStore(url, opts)
    obstore.put(store.client, store.full_key("other/data.bin"), b"not zarrckpt's")
    with pytest.raises(CheckpointExistsError, match="other/data.bin"):
        zarrckpt.save({"w": torch.zeros(3)}, url, storage_options=opts, overwrite=True)
    assert store.exists("other/data.bin")
    assert_bits_equal(torch.ones(3), zarrckpt.open(url, storage_options=opts).read("w"))


@pytest.mark.parametrize("bad", ["a//b", "a/../b", "a/./b"])
def test_url_keys_with_empty_or_dot_components_are_refused(s3_url, bad):
    for url in (f"{s3_url}/{bad}", f"memory://m/{bad}"):
        with pytest.raises(InvalidPathError, match="component"):
            zarrckpt.save({"w": torch.ones(1)}, url)
        with pytest.raises(InvalidPathError, match="component"):
            zarrckpt.open(url)


def test_a_refused_ranged_get_is_an_error_not_a_short_chunk(s3_server, s3_url, proxy):
    """The key holds '416' (the status of a range beyond the end): a 403 on the
    chunk's GET is still reported as the request failure it is."""
    opts = s3_server.options(endpoint=proxy.endpoint, max_retries=1,
                             retry_init_backoff=0.01, retry_max_backoff=0.02)
    url = f"{s3_url}/step-416"
    zarrckpt.save({"w": torch.randn(100, 10)}, url, storage_options=opts)
    real = _object.ObjectRangeReader.readv_into

    def refused(self, buffers, offset):
        proxy.fail(1000, "403")
        return real(self, buffers, offset)

    _object.ObjectRangeReader.readv_into = refused
    try:
        with pytest.raises(ObjectStoreError, match="403|Forbidden|AccessDenied|ermission"):
            zarrckpt.load({"w": torch.zeros(100, 10)}, url, storage_options=opts)
    finally:
        _object.ObjectRangeReader.readv_into = real
        proxy.fail(0)


def test_a_load_stops_at_its_first_failed_read(s3_server, s3_url, proxy):
    opts = s3_server.options(endpoint=proxy.endpoint, max_retries=1,
                             retry_init_backoff=0.01, retry_max_backoff=0.02)
    sd = {f"t{i:03d}": torch.full((8,), float(i)) for i in range(200)}
    zarrckpt.save(sd, s3_url, storage_options=opts)
    ckpt = zarrckpt.open(s3_url, storage_options=opts)  # before the server fails
    del ckpt
    proxy.reset_counts()
    proxy.fail(100000, "503")
    with pytest.raises((ObjectStoreError, zarrckpt.errors.DistributedSaveError)):
        zarrckpt.load({k: torch.zeros(8) for k in sd}, s3_url, storage_options=opts,
                      threads=2)
    proxy.fail(0)
    # 400 reads of 2 attempts each if nothing stopped them; the 16 threads stop
    # taking reads after the first failure
    assert proxy.requests < 120, proxy.requests


def test_an_azure_url_naming_its_account_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        "DefaultEndpointsProtocol=https;AccountName=accounta;AccountKey=a2V5;"
        "EndpointSuffix=core.windows.net",
    )
    client = build_client("abfs://cont@accountb.dfs.core.windows.net/ckpt", None)
    assert client.config["account_name"] == "accountb"
    with pytest.raises(InvalidPathError, match="accountb.*accountc|account 'accountc'"):
        build_client("abfs://cont@accountb.dfs.core.windows.net/ckpt",
                     {"account_name": "accountc"})
    client = build_client("az://cont/ckpt", None)  # no account in the URL: the environment's
    assert client.config["account_name"] == "accounta"


def test_a_dcp_directory_replaced_while_downloaded_is_refused(s3_server, s3_url, monkeypatch):
    opts = s3_server.options()
    url = f"{s3_url}/dcp"
    remote.upload_dir(_dcp_dir(1.0), url, opts, overwrite=False)
    newer = _dcp_dir(2.0)
    real = remote._download_key
    done: list[str] = []

    def download(store, key, path, **kw):
        n = real(store, key, path, **kw)
        if not done:  # another writer replaces the directory after the first object
            done.append(key)
            remote.upload_dir(newer, url, opts, overwrite=True)
        return n

    monkeypatch.setattr(remote, "_download_key", download)
    with pytest.raises(IncompleteCheckpointError, match="replaced or deleted"):
        remote.download_prefix(url, opts, tempfile.mkdtemp())
    monkeypatch.setattr(remote, "_download_key", real)
    assert_bits_equal(torch.full((4,), 2.0), _dcp_load(url, opts))


def test_a_dcp_object_replaced_in_place_while_downloaded_is_refused(
    s3_server, s3_url, monkeypatch
):
    """Replaced under the same key (no deletion in between): the ETag tells."""
    opts = s3_server.options()
    url = f"{s3_url}/dcp"
    remote.upload_dir(_dcp_dir(1.0), url, opts, overwrite=False)
    store = ObjectStore(url, opts)
    keys = store.object_keys()
    real = remote._download_key

    def download(store_, key, path, **kw):
        if key == keys[-1]:  # rewritten between the listing and its GET
            obstore.put(store.client, store.full_key(key), b"rewritten")
        return real(store_, key, path, **kw)

    monkeypatch.setattr(remote, "_download_key", download)
    with pytest.raises(IncompleteCheckpointError, match="replaced or deleted"):
        remote.download_prefix(url, opts, tempfile.mkdtemp())


def test_a_dcp_upload_never_replaces_another_writers_files(s3_server, s3_url):
    opts = s3_server.options()
    url = f"{s3_url}/dcp"
    remote.check_dir_destination(url, opts, overwrite=False, what="DCP")  # B's check
    remote.upload_dir(_dcp_dir(1.0), url, opts, overwrite=False)  # A lands meanwhile
    with pytest.raises(CheckpointExistsError, match="created by someone else"):
        remote.upload_dir(_dcp_dir(2.0), url, opts, overwrite=False)
    assert_bits_equal(torch.full((4,), 1.0), _dcp_load(url, opts))


def test_a_failed_dcp_upload_deletes_what_it_uploaded(s3_server, s3_url, monkeypatch):
    opts = s3_server.options()
    url = f"{s3_url}/dcp"
    real = remote._upload_key
    calls: list[str] = []

    def flaky(store, path, key, *, create):
        calls.append(key)
        if len(calls) == 2:
            raise ObjectStoreError("injected")
        return real(store, path, key, create=create)

    monkeypatch.setattr(remote, "_upload_key", flaky)
    with pytest.raises(ObjectStoreError, match="injected"):
        remote.upload_dir(_dcp_dir(1.0), url, opts, overwrite=False)
    monkeypatch.setattr(remote, "_upload_key", real)
    assert ObjectStore(url, opts).object_keys() == []
    remote.upload_dir(_dcp_dir(1.0), url, opts, overwrite=False)  # a retry just works
    assert_bits_equal(torch.full((4,), 1.0), _dcp_load(url, opts))


def test_a_connection_string_for_another_account_is_not_used(monkeypatch):
    sas = "BlobEndpoint=https://acct2.blob.core.windows.net/;SharedAccessSignature=sv=1"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", sas)
    client = build_client("az://cont@acct1.blob.core.windows.net/p", None)
    assert client.config["account_name"] == "acct1"
    assert "acct2" not in str(client.config.get("endpoint", ""))
    with pytest.raises(InvalidPathError, match="'acct2'"):
        build_client("az://cont@acct1.blob.core.windows.net/p", {"connection_string": sas})


def test_overwriting_a_damaged_checkpoint_says_so():
    url = f"memory://{os.urandom(6).hex()}/ck"
    zarrckpt.save({"w": torch.ones(3)}, url)
    store = ObjectStore(url)
    obstore.put(store.client, store.full_key("zarr.json"), b"{ damaged")
    with pytest.raises(CheckpointExistsError, match="damaged"):
        zarrckpt.save({"w": torch.zeros(3)}, url, overwrite=True)
