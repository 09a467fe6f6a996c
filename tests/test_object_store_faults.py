"""Faults between zarrckpt and the object store, injected by an HTTP proxy on
127.0.0.1 in front of the moto server (tests/_s3.py FaultProxy): throttling
(503 SlowDown), server errors and dropped connections are retried with
backoff; client errors (4xx) are not; a server that keeps failing ends in an
ObjectStoreError naming the key once the retry bound runs out."""

from __future__ import annotations

import pytest
import torch
from _s3 import FaultProxy
from conftest import assert_bits_equal

import zarrckpt
from zarrckpt.errors import DistributedSaveError, ObjectStoreError
from zarrckpt.storage._object import ObjectStore


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint.removeprefix("http://"))
    yield p
    p.close()


def _options(s3_server, proxy, **extra):
    settings = {
        "endpoint": proxy.endpoint,
        "max_retries": 4,
        "retry_init_backoff": 0.01,
        "retry_max_backoff": 0.05,
        **extra,
    }
    return s3_server.options(**settings)


@pytest.mark.parametrize("mode", ["503", "500", "reset"])
def test_save_and_load_survive_transient_faults(s3_server, s3_url, proxy, mode):
    opts = _options(s3_server, proxy)
    sd = {"w": torch.randn(200, 30), "b": torch.arange(9), "n": {"step": 3}}
    proxy.fail(3, mode)
    zarrckpt.save(sd, s3_url, storage_options=opts)
    assert proxy.faults == 3
    proxy.fail(3, mode)
    out = {"w": torch.zeros(200, 30), "b": torch.zeros(9, dtype=torch.long), "n": {"step": 0}}
    zarrckpt.load(out, s3_url, storage_options=opts)
    assert proxy.faults == 6
    assert_bits_equal(sd["w"], out["w"])
    assert_bits_equal(sd["b"], out["b"])
    assert out["n"] == {"step": 3}


def test_gives_up_with_an_error_naming_the_key(s3_server, s3_url, proxy):
    opts = _options(s3_server, proxy, max_retries=2)
    zarrckpt.save({"w": torch.ones(5)}, s3_url, storage_options=opts)
    proxy.fail(1000, "503")
    with pytest.raises(ObjectStoreError, match=r"GET of '~commit/zarr.json'") as info:
        zarrckpt.open(s3_url, storage_options=opts)
    assert isinstance(info.value, OSError)
    assert s3_url in str(info.value) and "retry bound" in str(info.value)
    # the first attempt and 2 retries of each of the open's two GETs (sent together)
    assert proxy.faults == 6


def test_save_that_gives_up_raises_and_commits_nothing(s3_server, s3_url, proxy):
    opts = _options(s3_server, proxy, max_retries=1)
    proxy.fail(1000, "503")
    with pytest.raises((ObjectStoreError, DistributedSaveError)):
        zarrckpt.save({"w": torch.ones(5)}, s3_url, storage_options=opts)
    proxy.fail(0)
    store = ObjectStore(s3_url, s3_server.options())
    assert not store.exists("~commit/zarr.json")


def test_client_errors_are_not_retried(s3_server, s3_url, proxy):
    opts = _options(s3_server, proxy)
    zarrckpt.save({"w": torch.ones(5)}, s3_url, storage_options=opts)
    proxy.fail(1, "403")
    before = proxy.requests
    with pytest.raises(ObjectStoreError, match="403|Forbidden|AccessDenied|ermission"):
        zarrckpt.open(s3_url, storage_options=opts)
    # the open's two GETs (sent together), the refused one not retried
    assert proxy.requests - before == 2
    assert proxy.faults == 1
