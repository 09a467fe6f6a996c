"""Requests per checkpoint on an object store, seen by a proxy on 127.0.0.1 in
front of the moto server (tests/_s3.py FaultProxy): many small tensors cost one
GET per chunk object plus one per array's zarr.json on load (no HEAD for sizes),
``open`` is two GETs sent together, a zarr view of one tensor is two GETs, and uploads and
downloads keep many requests in flight at once (requests there cost a round
trip, not CPU)."""

from __future__ import annotations

import collections
import re

import pytest
import torch
from _s3 import FaultProxy
from conftest import assert_bits_equal

import zarrckpt

N_TENSORS = 40


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint.removeprefix("http://"))
    yield p
    p.close()


def _small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"t{i:03d}": torch.randn(256, generator=g) for i in range(N_TENSORS)}


def _kinds(log: list[tuple[str, str]], bucket: str, prefix: str) -> collections.Counter:
    """``(method, key with digits as N)`` of every request below the checkpoint."""
    out: collections.Counter = collections.Counter()
    for method, path in log:
        key = path.removeprefix(f"/{bucket}/{prefix}/") if path.startswith(
            f"/{bucket}/{prefix}/"
        ) else path
        out[method, re.sub(r"\d+", "N", key)] += 1
    return out


def test_load_issues_one_get_per_object_and_no_head(s3_server, s3_url, proxy):
    opts = s3_server.options(endpoint=proxy.endpoint)
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    sd = _small_state()
    zarrckpt.save(sd, s3_url, storage_options=opts)
    saved = _kinds(proxy.log, bucket, prefix)
    assert saved["PUT", "tN/zarr.json"] == N_TENSORS
    assert saved["PUT", "tN/c.N"] == N_TENSORS
    assert sum(saved.values()) <= 2 * N_TENSORS + 12

    proxy.reset_counts()
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    zarrckpt.load(out, s3_url, storage_options=opts)
    for k in sd:
        assert_bits_equal(sd[k], out[k], k)
    loaded = _kinds(proxy.log, bucket, prefix)
    assert not [k for k in loaded if k[0] == "HEAD"], loaded
    assert loaded["GET", "tN/c.N"] == N_TENSORS
    assert loaded["GET", "tN/zarr.json"] == N_TENSORS
    assert sum(loaded.values()) <= 2 * N_TENSORS + 4, loaded


def test_open_and_a_zarr_view_read_only_what_they_need(s3_server, s3_url, proxy):
    opts = s3_server.options(endpoint=proxy.endpoint)
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    sd = _small_state()
    zarrckpt.save(sd, s3_url, storage_options=opts)
    proxy.reset_counts()
    proxy.delay = 0.2
    ckpt = zarrckpt.open(s3_url, storage_options=opts)
    proxy.delay = 0.0
    opened = _kinds(proxy.log, bucket, prefix)
    assert opened == {("GET", "~commit/zarr.json"): 1, ("GET", "zarr.json"): 1}, opened
    # both sent together: an open costs one round trip
    assert proxy.max_in_flight == 2

    proxy.reset_counts()
    view = ckpt["t007"]
    assert_bits_equal(sd["t007"], torch.from_numpy(view[...]))
    viewed = _kinds(proxy.log, bucket, prefix)
    # the array's zarr.json once (checked against the manifest, then handed to zarr
    # from memory) and its chunk: no zarr v2 probes (.zarray, .zattrs)
    assert viewed == {("GET", "tN/zarr.json"): 1, ("GET", "tN/c.N"): 1}, viewed


def test_small_objects_go_up_and_down_many_at_once(s3_server, s3_url, proxy):
    """With threads=2 the object store still sees many requests at once: each I/O
    thread's share runs ``ObjectStore.requests_per_thread`` requests in flight."""
    opts = s3_server.options(endpoint=proxy.endpoint)
    sd = _small_state()
    proxy.delay = 0.05  # a round trip: the requests overlap only if issued together
    zarrckpt.save(sd, s3_url, storage_options=opts, threads=2)
    assert proxy.max_in_flight >= 8, proxy.max_in_flight
    proxy.reset_counts()
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    zarrckpt.load(out, s3_url, storage_options=opts, threads=2)
    assert proxy.max_in_flight >= 8, proxy.max_in_flight
    for k in sd:
        assert_bits_equal(sd[k], out[k], k)


def test_consecutive_inner_chunks_are_read_with_one_ranged_get(s3_server, s3_url, proxy):
    """A piece object of 8 inner chunks of 1 MiB: its index, then one GET for all
    eight (coalesced ranges), not one per inner chunk."""
    opts = s3_server.options(endpoint=proxy.endpoint)
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    w = torch.randn(2048, 1024, generator=torch.Generator().manual_seed(5))  # 8 MiB
    zarrckpt.save({"w": w}, s3_url, storage_options=opts)
    proxy.reset_counts()
    out = {"w": torch.zeros_like(w)}
    zarrckpt.load(out, s3_url, storage_options=opts)
    assert_bits_equal(w, out["w"])
    loaded = _kinds(proxy.log, bucket, prefix)
    chunk_gets = {k: v for k, v in loaded.items() if k[0] == "GET" and "/c." in k[1]}
    assert chunk_gets == {("GET", "w/c.N.N"): 2}, loaded  # the shard index, then the data


def test_a_large_piece_goes_up_in_parts_streamed_from_its_buffers(s3_server, s3_url, proxy):
    """A 20 MiB piece (shard index, 20 inner chunks and their crc32c: many buffers)
    is uploaded as a multipart upload fed from those buffers, and reads back
    bit-exact."""
    opts = s3_server.options(endpoint=proxy.endpoint)
    w = torch.randn(5120, 1024, generator=torch.Generator().manual_seed(6))  # 20 MiB
    zarrckpt.save({"w": w}, s3_url, storage_options=opts)
    posts = [p for m, p in proxy.log if m == "POST" and p.endswith("/w/c.0.0")]
    parts = [p for m, p in proxy.log if m == "PUT" and p.endswith("/w/c.0.0")]
    assert len(posts) == 2  # initiate and complete
    assert len(parts) >= 3  # 8 MiB parts
    out = {"w": torch.zeros_like(w)}
    zarrckpt.load(out, s3_url, storage_options=opts)
    assert_bits_equal(w, out["w"])
