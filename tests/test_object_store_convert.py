"""The converters with a zarrckpt checkpoint on an S3 server (moto on 127.0.0.1),
configured by ``storage_options`` only: the environment points at a dead loopback
port, so a converter that dropped the options would fail. Every tensor bit-exact.
torch.save, safetensors and DCP files on object stores: tests/test_object_store_files.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_bits_equal

import zarrckpt
from zarrckpt import convert
from zarrckpt.errors import InvalidPathError


def _sd() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "emb": torch.randn(50, 8, generator=g),
        "ids": torch.arange(7),
        "h": torch.randn(3, generator=g).half(),
    }


def _same(sd: dict, back: dict) -> None:
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert_bits_equal(v, back[k], k)


def test_every_converter_takes_storage_options(s3_server, tmp_path, no_env):
    from safetensors.torch import load_file, save_file

    options = s3_server.options()
    bucket = s3_server.new_bucket()
    sd = _sd()
    pt, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save(sd, pt)
    save_file(sd, str(st))
    # torch.save -> s3 -> torch.save
    convert.from_torch_save(pt, f"s3://{bucket}/pt", storage_options=options)
    convert.to_torch_save(f"s3://{bucket}/pt", tmp_path / "back.pt", storage_options=options)
    _same(sd, torch.load(tmp_path / "back.pt", weights_only=True))
    # safetensors -> s3 -> safetensors
    convert.from_safetensors(st, f"s3://{bucket}/st", storage_options=options)
    convert.to_safetensors(
        f"s3://{bucket}/st", tmp_path / "back.safetensors", storage_options=options
    )
    _same(sd, load_file(str(tmp_path / "back.safetensors")))
    # s3 -> DCP directory -> s3
    convert.to_dcp(f"s3://{bucket}/pt", tmp_path / "dcp", storage_options=options)
    convert.from_dcp(tmp_path / "dcp", f"s3://{bucket}/dcp", storage_options=options)
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    zarrckpt.load(out, f"s3://{bucket}/dcp", storage_options=options)
    _same(sd, out)
    # the dispatcher, and a two-step conversion through a zarrckpt side on s3 is not
    # needed: torch.save -> s3 with convert.convert
    convert.convert(pt, f"s3://{bucket}/any", storage_options=options)
    convert.convert(f"s3://{bucket}/any", tmp_path / "any.pt", storage_options=options)
    _same(sd, torch.load(tmp_path / "any.pt", weights_only=True))


def test_cli_convert_takes_storage_options(s3_server, tmp_path, no_env, capsys):
    from zarrckpt.cli import main

    options = json.dumps(s3_server.options())
    url = f"s3://{s3_server.new_bucket()}/ck"
    sd = _sd()
    torch.save(sd, tmp_path / "m.pt")
    assert main(["convert", str(tmp_path / "m.pt"), url, "--storage-options", options]) == 0
    argv = ["convert", url, str(tmp_path / "m.safetensors"), "--storage-options", options]
    assert main(argv) == 0
    from safetensors.torch import load_file

    _same(sd, load_file(str(tmp_path / "m.safetensors")))
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "m.pt"), url, "--storage-options", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_storage_options_without_an_object_store_side_are_refused(tmp_path):
    torch.save(_sd(), tmp_path / "m.pt")
    with pytest.raises(InvalidPathError, match="storage_options"):
        convert.convert(tmp_path / "m.pt", tmp_path / "ck", storage_options={"region": "x"})
    with pytest.raises(InvalidPathError, match="storage_options"):
        convert.from_torch_save(tmp_path / "m.pt", tmp_path / "ck", storage_options={})
    assert not (tmp_path / "ck").exists()


def test_foreign_formats_on_object_stores_are_not_taken_for_local_paths(
    s3_server, tmp_path, monkeypatch
):
    """Once refused, now converted: nothing of them lands in the working directory."""
    monkeypatch.chdir(tmp_path)  # a URL taken for a relative path would land here
    options = s3_server.options()
    torch.save(_sd(), tmp_path / "m.pt")
    url = f"s3://{s3_server.new_bucket()}"
    ck = convert.convert(tmp_path / "m.pt", f"{url}/ck", storage_options=options).dst
    calls = {
        "safetensors destination": lambda: convert.convert(
            tmp_path / "m.pt", f"{url}/m.safetensors", storage_options=options
        ),
        "DCP destination": lambda: convert.convert(
            ck, f"{url}/dcp", dst_format="dcp", storage_options=options
        ),
        "torch.save destination": lambda: convert.to_torch_save(
            ck, f"{url}/m.pt", storage_options=options
        ),
        "torch.save source": lambda: convert.from_torch_save(
            f"{url}/m.pt", f"{url}/a", storage_options=options
        ),
    }
    for name, call in calls.items():
        call()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"], name
    out = {k: torch.zeros_like(v) for k, v in _sd().items()}
    zarrckpt.load(out, f"{url}/a", storage_options=options)
    _same(_sd(), out)
