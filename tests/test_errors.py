"""Error classes: hierarchy, the built-ins they refine, and messages that name
the key, the path and what was expected."""

from __future__ import annotations

import os
import pickle
from typing import Any

import pytest
import torch
from conftest import save_fast

import zarrckpt
from zarrckpt import errors
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedSaveError,
    IncompleteCheckpointError,
    InvalidKeyError,
    MissingKeysError,
    ShapeMismatchError,
    StateDictMismatchError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedValueError,
    ZarrCkptError,
)
from zarrckpt.format._marker import COMMIT_MARKER

HIERARCHY: dict[type[Exception], tuple[type[BaseException], ...]] = {
    CheckpointNotFoundError: (FileNotFoundError, OSError),
    CheckpointExistsError: (FileExistsError, OSError),
    IncompleteCheckpointError: (FileNotFoundError, OSError),
    CorruptCheckpointError: (ValueError,),
    StateDictMismatchError: (ValueError,),
    MissingKeysError: (StateDictMismatchError, KeyError, LookupError, ValueError),
    ShapeMismatchError: (StateDictMismatchError, ValueError),
    UnsafeCheckpointError: (ValueError,),
    InvalidKeyError: (ValueError,),
    UnsupportedValueError: (TypeError,),
    DistributedSaveError: (RuntimeError,),
    StorageError: (OSError,),
}


@pytest.mark.parametrize("cls", list(HIERARCHY), ids=lambda c: c.__name__)
def test_hierarchy(cls: type[Exception]) -> None:
    assert issubclass(cls, ZarrCkptError)
    assert issubclass(cls, Exception)
    for base in HIERARCHY[cls]:
        assert issubclass(cls, base), f"{cls.__name__} should refine {base.__name__}"
    assert getattr(errors, cls.__name__) is cls
    assert cls.__name__ in errors.__all__
    assert cls.__doc__


def _make(cls: type[Exception]) -> Exception:
    if cls is MissingKeysError:
        return MissingKeysError("checkpoint '/p' lacks ['a.b']", ["a.b"])
    return cls("message naming 'key' and '/p'")


@pytest.mark.parametrize("cls", list(HIERARCHY), ids=lambda c: c.__name__)
def test_errors_survive_pickling(cls: type[Exception]) -> None:
    """Errors cross process boundaries (multiprocessing, torch.distributed helpers)."""
    err = _make(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err)
    if cls is MissingKeysError:
        assert back.missing == ["a.b"]  # type: ignore[attr-defined]


def test_missing_keys_str_is_not_quoted() -> None:
    err = MissingKeysError("checkpoint '/p' lacks ['x']", ["x"])
    assert str(err) == "checkpoint '/p' lacks ['x']"  # KeyError would repr() it
    assert err.missing == ["x"]


# ----------------------------------------------------------------- raised in practice


@pytest.fixture
def saved(ckpt_dir: Any) -> str:
    path = str(ckpt_dir / "ckpt")
    save_fast({"layer": {"weight": torch.randn(4, 3)}, "step": 3}, path)
    return path


def test_not_found(ckpt_dir: Any) -> None:
    missing = str(ckpt_dir / "missing")
    for call in (lambda: zarrckpt.open(missing), lambda: zarrckpt.load({}, missing)):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert isinstance(info.value, CheckpointNotFoundError)
        assert missing in str(info.value)


def test_not_found_for_a_plain_file(ckpt_dir: Any) -> None:
    f = ckpt_dir / "model.pt"
    f.write_bytes(b"PK")
    with pytest.raises(CheckpointNotFoundError) as info:
        zarrckpt.open(f)
    assert str(f) in str(info.value)


def test_save_below_a_file(ckpt_dir: Any) -> None:
    # missing parents are created (tests/test_path_errors.py); a file in the way is refused
    (ckpt_dir / "no").write_bytes(b"a file")
    path = str(ckpt_dir / "no" / "such" / "dir")
    with pytest.raises(ZarrCkptError) as info:
        zarrckpt.save({"x": torch.zeros(1)}, path)
    assert isinstance(info.value, OSError)
    assert "no" in str(info.value) and "not a directory" in str(info.value)
    assert (ckpt_dir / "no").read_bytes() == b"a file"


def test_exists(saved: str) -> None:
    with pytest.raises(FileExistsError) as info:
        zarrckpt.save({"x": torch.zeros(1)}, saved)
    assert isinstance(info.value, CheckpointExistsError)
    assert saved in str(info.value) and "overwrite" in str(info.value)


def test_incomplete(saved: str) -> None:
    os.remove(os.path.join(saved, COMMIT_MARKER))
    with pytest.raises(FileNotFoundError) as info:
        zarrckpt.open(saved)
    assert isinstance(info.value, IncompleteCheckpointError)
    assert saved in str(info.value) and "commit" in str(info.value)


def test_corrupt_names_key_path_and_chunk(saved: str) -> None:
    chunk = os.path.join(saved, "layer.weight", "c.0.0")
    with open(chunk, "r+b") as f:
        f.write(b"\xff\xff")
    with pytest.raises(ValueError) as info:
        zarrckpt.load({"layer": {"weight": torch.zeros(4, 3)}}, saved)
    msg = str(info.value)
    assert isinstance(info.value, CorruptCheckpointError)
    assert saved in msg and "layer.weight" in msg and "c.0.0" in msg and "crc32c" in msg


def test_missing_keys(saved: str) -> None:
    with pytest.raises(KeyError) as info:
        zarrckpt.load({"layer": {"weight": torch.zeros(4, 3), "bias": torch.zeros(3)}}, saved)
    err = info.value
    assert isinstance(err, MissingKeysError) and err.missing == ["layer.bias"]
    assert saved in str(err) and "layer.bias" in str(err) and "strict=False" in str(err)


def test_shape_mismatch(saved: str) -> None:
    with pytest.raises(ValueError) as info:
        zarrckpt.load({"layer": {"weight": torch.zeros(3, 4)}}, saved)
    msg = str(info.value)
    assert isinstance(info.value, ShapeMismatchError)
    assert saved in msg and "layer.weight" in msg and "[4, 3]" in msg and "[3, 4]" in msg


def test_unsafe(ckpt_dir: Any) -> None:
    path = str(ckpt_dir / "u")
    with pytest.raises(ValueError) as info:
        zarrckpt.save({"opt": {"sched": object()}}, path)
    assert isinstance(info.value, UnsafeCheckpointError)
    assert path in str(info.value) and "opt.sched" in str(info.value)


def test_invalid_key(ckpt_dir: Any) -> None:
    path = str(ckpt_dir / "k")
    with pytest.raises(ValueError) as info:
        zarrckpt.save({"a": {"b": torch.zeros(1)}, "a.b": torch.zeros(1)}, path)
    assert isinstance(info.value, InvalidKeyError)
    assert path in str(info.value) and "a.b" in str(info.value)


def test_unsupported_value(ckpt_dir: Any) -> None:
    path = str(ckpt_dir / "v")
    with pytest.raises(TypeError) as info:
        zarrckpt.save({"q": {"w": torch.zeros(2, dtype=torch.float8_e4m3fnuz)}}, path)
    msg = str(info.value)
    assert isinstance(info.value, UnsupportedValueError)
    assert path in msg and "q.w" in msg and "float8_e4m3fnuz" in msg and "supported" in msg


def test_missing_key_in_open_checkpoint(saved: str) -> None:
    ckpt = zarrckpt.open(saved)
    with pytest.raises(KeyError) as info:
        ckpt.read("layer.bias")
    assert isinstance(info.value, MissingKeysError)
    assert "layer.bias" in str(info.value) and saved in str(info.value)


def test_storage_error_keeps_errno_and_crosses_processes() -> None:
    """StorageError.wrap keeps the errno, names the step and the file; it pickles."""
    import errno

    raw = OSError(errno.ENOSPC, "No space left on device", "/p/.ckpt.zarrckpt-tmp-1/a/c/0")
    err = StorageError.wrap(raw, "writing the checkpoint '/p'")
    assert isinstance(err, StorageError) and err.errno == errno.ENOSPC
    assert "writing the checkpoint '/p' failed: No space left on device" in str(err)
    assert "/p/.ckpt.zarrckpt-tmp-1/a/c/0" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StorageError and back.errno == errno.ENOSPC and str(back) == str(err)
    already = CheckpointNotFoundError("no checkpoint at '/p'")
    assert StorageError.wrap(already, "x") is already
