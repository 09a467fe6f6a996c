"""Shared helpers of the single-process acceptance tests.

Tensors are compared bit for bit: both sides are turned into their raw bytes
(C order), so NaN payloads, signed zeros and float8 / bfloat16 bit patterns
must survive exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

import zarrckpt

#: every dtype of the core issue
DTYPES: list[torch.dtype] = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]

PYTHON = sys.executable


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``np.dtype('bfloat16')`` -> ``"bfloat16"``."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(np.dtype(dtype))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of random *bits* (every bit pattern, NaN payloads included; bools 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def tensor_bytes(x: Any) -> bytes:
    """Raw C-order bytes of a torch tensor or numpy array (any dtype, any strides)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    a = np.ascontiguousarray(np.asarray(x)).reshape(-1)
    return a.view(np.uint8).tobytes()


def digest(x: Any) -> tuple[str, tuple[int, ...], str]:
    """(dtype name, shape, sha256 of the bytes): what bit-exact comparisons compare."""
    return (dtype_name(x.dtype), tuple(x.shape), hashlib.sha256(tensor_bytes(x)).hexdigest())


def bits_equal(expected: torch.Tensor, actual: Any) -> bool:
    return digest(expected) == digest(actual)


def assert_bits_equal(expected: torch.Tensor, actual: Any, what: str = "") -> None:
    """Same dtype, same shape, same bytes."""
    e, a = digest(expected), digest(actual)
    assert e[:2] == a[:2], f"{what}: dtype/shape {a[:2]} != expected {e[:2]}"
    assert e[2] == a[2], f"{what}: bytes differ ({dtype_name(expected.dtype)} {e[1]})"


def save_fast(state_dict: Any, path: Any, **options: Any) -> None:
    """``zarrckpt.save`` without fsync (durability is tested in test_crash.py)."""
    options.setdefault("fsync", False)
    zarrckpt.save(state_dict, path, **options)


def array_path(fqn: str) -> str:
    from zarrckpt.format._fqn import fqn_to_path

    return fqn_to_path(fqn)


# ----------------------------------------------------------------- other readers

_PLAIN_ZARR_READER = r"""
import hashlib, json, sys
import numpy as np
import zarr

target, paths = json.loads(sys.stdin.read())
{open_group}
out = {}
for path in paths:
    data = np.asarray(group[path][...])
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    out[path] = [str(data.dtype), list(data.shape), hashlib.sha256(flat.tobytes()).hexdigest()]
out["__modules__"] = sorted(m for m in ("zarrckpt", "torch") if m in sys.modules)
print(json.dumps(out))
"""


#: how the reader opens a local checkpoint directory (``target`` is its path)
_OPEN_LOCAL = 'group = zarr.open_group(target, mode="r")'


def plain_zarr_digests(
    ckpt: Any,
    paths: list[str],
    *,
    open_group: str = _OPEN_LOCAL,
    env: dict[str, str] | None = None,
) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Read arrays with plain zarr-python in a subprocess that never imports zarrckpt.

    ``ckpt`` is a checkpoint directory, or for ``open_group`` (Python lines setting
    ``group`` from the JSON value ``target``: an object store's client) whatever
    JSON it needs. Returns ``{array path: (dtype, shape, sha256)}``. The
    subprocess asserts that neither zarrckpt nor torch got imported (the bfloat16
    / float8 data types come from the torch-free zarr plug-in registered by entry
    point).
    """
    local = open_group == _OPEN_LOCAL
    proc = subprocess.run(
        [PYTHON, "-c", _PLAIN_ZARR_READER.replace("{open_group}", open_group)],
        input=json.dumps([os.fspath(ckpt) if local else ckpt, paths]),
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.fspath(ckpt)) if local else None,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, f"plain zarr reader failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("__modules__") == [], "the plain-zarr subprocess imported zarrckpt/torch"
    return {p: (d, tuple(s), h) for p, (d, s, h) in out.items()}


def tensorstore_read(ckpt: Any, path: str) -> np.ndarray:
    """Read one array with tensorstore's zarr3 driver."""
    import tensorstore as ts

    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": f"{os.fspath(ckpt)}/{path}/"},
    }
    return np.asarray(ts.open(spec).result().read().result())


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def no_env(monkeypatch: Any) -> None:
    """No AWS credentials in the environment and an endpoint where nothing listens:
    only ``storage_options`` can reach the test server."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def ckpt_dir(tmp_path: Any) -> Any:
    """A fresh empty directory to hold checkpoints (tmp_path/ckpts)."""
    d = tmp_path / "ckpts"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def s3_server() -> Any:
    """A real S3 server (moto) on 127.0.0.1 for the whole test session (tests/_s3.py)."""
    from _s3 import moto_server

    with moto_server() as server:
        yield server


@pytest.fixture
def s3_url(s3_server: Any) -> str:
    """``s3://<fresh bucket>/ckpt``: an empty checkpoint prefix on the loopback server."""
    return f"s3://{s3_server.new_bucket()}/ckpt"


@pytest.fixture(scope="session")
def azure_server() -> Any:
    """A real Azure Blob server (Azurite) on 127.0.0.1 for the whole session
    (tests/_azure.py); fails, never skips, when Azurite cannot run."""
    from _azure import azurite_server

    try:
        server_cm = azurite_server()
        server = server_cm.__enter__()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield server
    finally:
        server_cm.__exit__(None, None, None)


@pytest.fixture
def az_url(azure_server: Any) -> str:
    """``az://<fresh container>/ckpt``: an empty checkpoint prefix on the loopback server."""
    return f"az://{azure_server.new_container()}/ckpt"
