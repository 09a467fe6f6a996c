"""torch.save files, safetensors files and DCP directories on an S3 server (moto on
127.0.0.1) as the source and the destination of every converter: downloaded into
(or written into, then uploaded from) a private temporary directory that is removed
afterwards. Configured by ``storage_options`` only (the environment points at a dead
port) except for the command line, which takes the environment. Bit-exact."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from _s3 import ACCESS_KEY, REGION, SECRET_KEY, FaultProxy
from conftest import assert_bits_equal, random_tensor

import zarrckpt
from zarrckpt import convert
from zarrckpt.errors import CheckpointExistsError, CheckpointNotFoundError, ObjectStoreError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FORMATS = ["torch", "safetensors", "dcp"]
NAMES = {"torch": "model.pt", "safetensors": "model.safetensors", "dcp": "dcp"}
TO = {"torch": convert.to_torch_save, "safetensors": convert.to_safetensors, "dcp": convert.to_dcp}
FROM = {
    "torch": convert.from_torch_save,
    "safetensors": convert.from_safetensors,
    "dcp": convert.from_dcp,
}


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch) -> Path:
    """TMPDIR for the conversions: every test checks that nothing is left in it."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _s3(server: Any) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def _keys(server: Any, bucket: str, prefix: str = "") -> list[str]:
    listed = _s3(server).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _fetch(server: Any, bucket: str, key: str, local: Path) -> Path:
    """Download the object (or every object below the prefix) ``key`` with boto3."""
    keys = _keys(server, bucket, key + "/")
    if not keys:
        _s3(server).download_file(bucket, key, str(local))
        return local
    for k in keys:
        target = local / k[len(key) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        _s3(server).download_file(bucket, k, str(target))
    return local


def _put_tree(server: Any, bucket: str, key: str, local: Path) -> None:
    """Upload the file (or every file below the directory) ``local`` with boto3."""
    if local.is_file():
        _s3(server).upload_file(str(local), bucket, key)
        return
    for p in sorted(local.rglob("*")):
        if p.is_file():
            _s3(server).upload_file(str(p), bucket, f"{key}/{p.relative_to(local).as_posix()}")


def _sd(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.int64, torch.float16)) -> dict:
    return {
        f"t{i}_{str(dt).removeprefix('torch.')}": random_tensor(dt, (33, 5), seed=i)
        for i, dt in enumerate(dtypes)
    }


def _write_local(fmt: str, sd: dict, path: Path) -> None:
    if fmt == "torch":
        torch.save(sd, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, checkpoint_id=str(path), no_dist=True)


def _read_local(fmt: str, path: Path, like: dict) -> dict:
    if fmt == "torch":
        return torch.load(path, weights_only=True)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch.distributed.checkpoint as dcp

    out = {k: torch.zeros_like(v) for k, v in like.items()}
    dcp.load(out, checkpoint_id=str(path), no_dist=True)
    return out


def _same(sd: dict, back: dict) -> None:
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert_bits_equal(v, back[k], k)


def _load(path: Any, sd: dict, **options: Any) -> dict:
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    zarrckpt.load(out, path, **options)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_converter_reads_and_writes_foreign_files_on_s3(
    fmt, s3_server, tmp_path, no_env, tmpdir_env
):
    opts = s3_server.options()
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/files/{NAMES[fmt]}"
    sd = _sd()
    ckpt = tmp_path / "ckpt"
    zarrckpt.save(sd, ckpt, fsync=False)
    # local zarrckpt -> foreign file on s3 (read back with boto3 + the format's own reader)
    result = TO[fmt](ckpt, url, storage_options=opts)
    assert result.dst == url and result.tensors == len(sd)
    written = _fetch(s3_server, bucket, f"files/{NAMES[fmt]}", tmp_path / fmt)
    _same(sd, _read_local(fmt, written, sd))
    if fmt == "dcp":  # its commit point is there
        assert f"files/{NAMES[fmt]}/.metadata" in _keys(s3_server, bucket)
    # foreign file on s3 -> local zarrckpt
    result = FROM[fmt](url, tmp_path / "back", storage_options=opts)
    assert result.src == url
    _same(sd, _load(tmp_path / "back", sd))
    # foreign file on s3 -> zarrckpt on s3 (both sides configured by the same options)
    FROM[fmt](url, f"s3://{bucket}/ck", storage_options=opts)
    _same(sd, _load(f"s3://{bucket}/ck", sd, storage_options=opts))
    # the dispatcher tells the format of the remote source, both ways
    assert convert.detect_format(url, storage_options=opts) == fmt
    result = convert.convert(url, f"s3://{bucket}/any", storage_options=opts)
    assert (result.src_format, result.dst_format) == (fmt, "zarrckpt")
    _same(sd, _load(f"s3://{bucket}/any", sd, storage_options=opts))
    assert list(tmpdir_env.iterdir()) == []


def test_foreign_source_written_by_its_own_library(s3_server, tmp_path, no_env, tmpdir_env):
    """Files written by torch.save, safetensors and dcp.save, uploaded with boto3; a
    safetensors object without suffix is told by its first bytes."""
    opts = s3_server.options()
    bucket = s3_server.new_bucket()
    sd = _sd()
    for fmt, key in (("torch", "a.pt"), ("safetensors", "weights"), ("dcp", "d")):
        local = tmp_path / f"src_{fmt}"
        _write_local(fmt, sd, local)
        _put_tree(s3_server, bucket, key, local)
        url = f"s3://{bucket}/{key}"
        assert convert.detect_format(url, storage_options=opts) == fmt
        convert.convert(url, tmp_path / f"ck_{fmt}", storage_options=opts)
        _same(sd, _load(tmp_path / f"ck_{fmt}", sd))
    assert list(tmpdir_env.iterdir()) == []


def test_torch_save_on_s3_to_safetensors_on_s3_bit_exact(s3_server, tmp_path, no_env, tmpdir_env):
    opts = s3_server.options()
    bucket = s3_server.new_bucket()
    sd = _sd((torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.bool,
              torch.float16, torch.int32))
    torch.save(sd, tmp_path / "m.pt")
    _put_tree(s3_server, bucket, "in/m.pt", tmp_path / "m.pt")
    # the chain through a zarrckpt checkpoint on s3 ...
    convert.convert(f"s3://{bucket}/in/m.pt", f"s3://{bucket}/ck", storage_options=opts)
    convert.convert(f"s3://{bucket}/ck", f"s3://{bucket}/out/m.safetensors", storage_options=opts)
    from safetensors.torch import load_file

    got = load_file(str(_fetch(s3_server, bucket, "out/m.safetensors", tmp_path / "a.st")))
    _same(sd, got)
    # ... and in one call (a temporary zarrckpt checkpoint in TMPDIR)
    result = convert.convert(
        f"s3://{bucket}/in/m.pt", f"s3://{bucket}/out/n.safetensors", storage_options=opts
    )
    assert (result.src_format, result.dst_format) == ("torch", "safetensors")
    _same(sd, load_file(str(_fetch(s3_server, bucket, "out/n.safetensors", tmp_path / "b.st"))))
    _same(sd, torch.load(_fetch(s3_server, bucket, "in/m.pt", tmp_path / "c.pt"),
                         weights_only=True))
    assert list(tmpdir_env.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_existing_destination_is_kept_without_overwrite(
    fmt, s3_server, tmp_path, no_env, tmpdir_env
):
    opts = s3_server.options()
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/{NAMES[fmt]}"
    old, new = _sd(), {k: v + 1 for k, v in _sd().items()}
    zarrckpt.save(old, tmp_path / "old", fsync=False)
    zarrckpt.save(new, tmp_path / "new", fsync=False)
    TO[fmt](tmp_path / "old", url, storage_options=opts)
    before = {k: _s3(s3_server).get_object(Bucket=bucket, Key=k)["Body"].read()
              for k in _keys(s3_server, bucket)}
    calls = {
        "converter": lambda: TO[fmt](tmp_path / "new", url, storage_options=opts),
        "convert": lambda: convert.convert(tmp_path / "new", url, dst_format=fmt,
                                           storage_options=opts),
        "two steps": lambda: convert.convert(foreign, url, dst_format=fmt, storage_options=opts),
    }
    foreign = tmp_path / ("m.safetensors" if fmt == "torch" else "m.pt")
    _write_local("safetensors" if fmt == "torch" else "torch", new, foreign)
    for name, call in calls.items():
        with pytest.raises(CheckpointExistsError, match="overwrite=True"):
            call()
        after = {k: _s3(s3_server).get_object(Bucket=bucket, Key=k)["Body"].read()
                 for k in _keys(s3_server, bucket)}
        assert after == before, name
    # overwrite=True replaces it (a DCP prefix: its old objects are gone)
    TO[fmt](tmp_path / "new", url, storage_options=opts, overwrite=True)
    _same(new, _read_local(fmt, _fetch(s3_server, bucket, NAMES[fmt], tmp_path / "x"), new))
    FROM[fmt](url, tmp_path / "back", storage_options=opts)
    _same(new, _load(tmp_path / "back", new))
    assert list(tmpdir_env.iterdir()) == []


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint.removeprefix("http://"))
    yield p
    p.close()


@pytest.mark.parametrize("fmt", ["safetensors", "dcp"])
def test_a_failed_upload_leaves_no_object_and_no_temp_dir(
    fmt, s3_server, proxy, tmp_path, no_env, tmpdir_env
):
    opts = s3_server.options(endpoint=proxy.endpoint, max_retries=0)
    bucket = s3_server.new_bucket()
    sd = _sd()
    zarrckpt.save(sd, tmp_path / "ck", fsync=False)

    def fail_from_now(done: int, *_: Any) -> None:  # while the file is written locally
        if done:
            proxy.fail(10_000, "500")

    with pytest.raises(ObjectStoreError, match="PUT"):
        TO[fmt](tmp_path / "ck", f"s3://{bucket}/{NAMES[fmt]}", storage_options=opts,
                progress=fail_from_now)
    proxy.fail(0)
    assert proxy.faults >= 1
    assert _keys(s3_server, bucket) == []
    assert list(tmpdir_env.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_source_names_the_url(fmt, s3_server, tmp_path, no_env, tmpdir_env):
    opts = s3_server.options()
    url = f"s3://{s3_server.new_bucket()}/nothing/{NAMES[fmt]}"
    with pytest.raises(CheckpointNotFoundError, match=url):
        FROM[fmt](url, tmp_path / "ck", storage_options=opts)
    with pytest.raises(CheckpointNotFoundError, match=url):
        convert.convert(url, tmp_path / "ck", storage_options=opts)
    assert not (tmp_path / "ck").exists()
    assert list(tmpdir_env.iterdir()) == []


def test_cli_converts_between_s3_urls_configured_by_the_environment(
    s3_server, tmp_path, monkeypatch, tmpdir_env, capsys
):
    from safetensors.torch import save_file

    from zarrckpt.cli import main

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.new_bucket()
    sd = _sd((torch.bfloat16, torch.float32))
    save_file(sd, str(tmp_path / "m.safetensors"))
    _put_tree(s3_server, bucket, "model.safetensors", tmp_path / "m.safetensors")
    argv = ["convert", f"s3://{bucket}/model.safetensors", f"s3://{bucket}/ckpt", "--plain"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "(safetensors) ->" in capsys.readouterr().out
    _same(sd, _load(f"s3://{bucket}/ckpt", sd))
    argv = ["convert", f"s3://{bucket}/ckpt", f"s3://{bucket}/back.pt", "--plain"]
    assert main(argv) == 0, capsys.readouterr().err
    _same(sd, torch.load(_fetch(s3_server, bucket, "back.pt", tmp_path / "b.pt"),
                         weights_only=True))
    assert main(argv) == 2  # exists
    assert "overwrite" in capsys.readouterr().err
    assert list(tmpdir_env.iterdir()) == []


def test_a_large_file_goes_up_in_parts_and_comes_back(
    s3_server, tmp_path, no_env, tmpdir_env, monkeypatch
):
    """Above the conditional-PUT bound a file is a multipart upload of PART_BYTES parts
    (S3's ETag of such an object ends in -<parts>); it downloads back bit-exact."""
    from zarrckpt.storage import _remote_files

    monkeypatch.setattr(_remote_files, "CREATE_PUT_MAX", 1 << 20)
    opts = s3_server.options()
    bucket = s3_server.new_bucket()
    sd = {"big": random_tensor(torch.float32, (1100, 4096), seed=5), "b": torch.arange(3)}
    zarrckpt.save(sd, tmp_path / "ck", fsync=False)
    url = f"s3://{bucket}/big.safetensors"
    convert.to_safetensors(tmp_path / "ck", url, storage_options=opts)
    parts = -(-_s3(s3_server).head_object(Bucket=bucket, Key="big.safetensors")["ContentLength"]
              // _remote_files.PART_BYTES)
    assert parts == 3
    etag = _s3(s3_server).head_object(Bucket=bucket, Key="big.safetensors")["ETag"]
    assert etag.strip('"').endswith(f"-{parts}")
    convert.from_safetensors(url, tmp_path / "back", storage_options=opts)
    _same(sd, _load(tmp_path / "back", sd))
    assert list(tmpdir_env.iterdir()) == []


def test_overwriting_a_dcp_prefix_leaves_no_stale_objects(s3_server, tmp_path, no_env):
    opts = s3_server.options()
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/dcp"
    big = {f"w{i}": torch.full((4,), float(i)) for i in range(6)}
    small = {"w0": torch.ones(2)}
    zarrckpt.save(big, tmp_path / "big", fsync=False)
    zarrckpt.save(small, tmp_path / "small", fsync=False)
    convert.to_dcp(tmp_path / "big", url, storage_options=opts)
    _s3(s3_server).put_object(Bucket=bucket, Key="dcp/stale.distcp", Body=b"x")
    convert.to_dcp(tmp_path / "small", url, storage_options=opts, overwrite=True)
    assert "dcp/stale.distcp" not in _keys(s3_server, bucket)
    local = _fetch(s3_server, bucket, "dcp", tmp_path / "fetched")
    _same(small, _read_local("dcp", local, small))


class _Custom:
    def __init__(self) -> None:
        self.x = 1


def test_the_local_checks_apply_to_a_downloaded_source(s3_server, tmp_path, no_env, tmpdir_env):
    """No unpickling without allow_pickle, a corrupt header refused; the errors name
    the URL the local copy came from."""
    from zarrckpt.errors import CorruptCheckpointError, UnsafeCheckpointError

    opts = s3_server.options()
    bucket = s3_server.new_bucket()
    torch.save({"w": torch.ones(2), "obj": _Custom()}, tmp_path / "p.pt")
    _put_tree(s3_server, bucket, "p.pt", tmp_path / "p.pt")
    _s3(s3_server).put_object(Bucket=bucket, Key="bad.safetensors", Body=b"\xff" * 64)
    with pytest.raises(UnsafeCheckpointError, match=f"s3://{bucket}/p.pt"):
        convert.from_torch_save(f"s3://{bucket}/p.pt", tmp_path / "a", storage_options=opts)
    with pytest.raises(CorruptCheckpointError, match=f"s3://{bucket}/bad.safetensors"):
        convert.from_safetensors(
            f"s3://{bucket}/bad.safetensors", tmp_path / "b", storage_options=opts
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert list(tmpdir_env.iterdir()) == []
