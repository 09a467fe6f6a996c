"""Object-store checkpoints and the rest of the world: the converters, the command
line (endpoint and credentials from the environment), and plain zarr-python
reading every array of an S3 checkpoint in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import DTYPES, assert_bits_equal, digest, plain_zarr_digests, random_tensor

import zarrckpt
from zarrckpt import convert


def _env(server) -> dict[str, str]:
    return {**os.environ, **server.env}


def test_convert_torch_save_to_s3_to_safetensors(s3_server, s3_url, tmp_path, monkeypatch):
    for k, v in s3_server.env.items():  # converters take the endpoint from the environment
        monkeypatch.setenv(k, v)
    sd = {"emb": torch.randn(50, 8), "ids": torch.arange(7), "h": torch.randn(3).half()}
    pt, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save(sd, pt)
    convert.convert(str(pt), s3_url)
    assert sorted(zarrckpt.open(s3_url)) == ["emb", "h", "ids"]
    convert.convert(s3_url, str(st))
    from safetensors.torch import load_file

    back = load_file(str(st))
    for k, v in sd.items():
        assert_bits_equal(v, back[k], k)


def test_cli_ls_info_stats_verify(s3_server, s3_url):
    zarrckpt.save(
        {"w": torch.ones(4, 3), "b": torch.arange(5)}, s3_url, storage_options=s3_server.options()
    )
    outs = {}
    for cmd in ("ls", "info", "stats", "verify"):
        proc = subprocess.run(
            [sys.executable, "-m", "zarrckpt", cmd, s3_url],
            env=_env(s3_server),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        outs[cmd] = proc.stdout
    assert "w" in outs["ls"] and "[4,3]" in outs["ls"]
    assert "tensors:" in outs["info"] and "2" in outs["info"]
    assert "int64" in outs["stats"]
    assert outs["verify"].startswith("OK") and s3_url in outs["verify"]


def test_cli_reports_a_missing_checkpoint(s3_server, s3_url):
    proc = subprocess.run(
        [sys.executable, "-m", "zarrckpt", "ls", s3_url],
        env=_env(s3_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no checkpoint at" in proc.stderr and s3_url in proc.stderr


@pytest.mark.slow
def test_plain_zarr_reads_every_array_from_s3(s3_server, s3_url):
    sd = {f"t{i}": random_tensor(d, (9, 4), seed=i) for i, d in enumerate(DTYPES)}
    zarrckpt.save(sd, s3_url, storage_options=s3_server.options())
    fsspec_options = {
        "key": s3_server.env["AWS_ACCESS_KEY_ID"],
        "secret": s3_server.env["AWS_SECRET_ACCESS_KEY"],
        "endpoint_url": s3_server.endpoint,
        "client_kwargs": {"region_name": s3_server.env["AWS_REGION"]},
    }
    out = plain_zarr_digests(  # asserts that neither zarrckpt nor torch was imported
        [s3_url, fsspec_options],
        sorted(sd),
        open_group='group = zarr.open_group(target[0], mode="r", storage_options=target[1])',
        env=_env(s3_server),
    )
    for k, v in sd.items():
        dtype, shape, sha = digest(v)
        assert out[k][1:] == (shape, sha), k


def test_diff_between_object_store_and_local_checkpoints(s3_server, s3_url, tmp_path):
    opts = s3_server.options()
    a = {"w": torch.ones(30, 4), "b": torch.arange(5), "step": 1}
    b = {"w": torch.ones(30, 4), "b": torch.arange(5) + 1, "step": 2, "new": torch.zeros(2)}
    zarrckpt.save(a, f"{s3_url}/a", storage_options=opts)
    zarrckpt.save(b, f"{s3_url}/b", storage_options=opts)
    zarrckpt.save(b, str(tmp_path / "b"))
    remote_b = zarrckpt.open(f"{s3_url}/b", storage_options=opts)
    for other in (remote_b, str(tmp_path / "b")):
        report = zarrckpt.open(f"{s3_url}/a", storage_options=opts).diff(other)
        assert not report.identical
        assert report.added == ["new"]
        assert sorted(report.values_changed) == ["step"]
        assert report.changed == ["b"]
    assert zarrckpt.open(str(tmp_path / "b")).diff(remote_b).identical

    proc = subprocess.run(
        [sys.executable, "-m", "zarrckpt", "diff", f"{s3_url}/a", f"{s3_url}/b"],
        env=_env(s3_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # exit code 1: they differ
    assert "new" in proc.stdout and "step" in proc.stdout and "b" in proc.stdout
