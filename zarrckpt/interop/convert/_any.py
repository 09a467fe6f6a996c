"""Any pair of formats: :func:`detect_format` and :func:`convert`."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from ...errors import CheckpointNotFoundError
from ...storage._files import file_size, is_dir, is_file, is_zip_file, read_head
from ...storage._local import is_object_url, open_store
from ...storage._paths import check_path, make_parents
from ...storage._remote_files import probe
from ...storage._remote_files import read_head as remote_head
from .._staged import StagedOutput
from ..dcp._source import is_dcp_dir
from ._common import FORMATS, ConvertResult, PathLike, ProgressFn
from ._dcp import from_dcp, to_dcp
from ._remote import check_destination, check_paths, scratch_dir
from ._safetensors import from_safetensors, to_safetensors
from ._torch import from_torch_save, to_torch_save

__all__ = ["convert", "detect_format"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")


def _looks_like_safetensors(path: str) -> bool:
    try:
        head = read_head(path, 9)
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return head[8:9] == b"{" and 8 + n <= file_size(path)
    except OSError:
        return False


def detect_format(
    path: PathLike,
    *,
    role: str = "source",
    src_format: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """The format of ``path``: ``"torch"``, ``"dcp"``, ``"safetensors"`` or ``"zarrckpt"``.

    A source is recognized by its content: a zarrckpt checkpoint directory
    (``zarr.json`` with a zarrckpt manifest, or a commit marker), a DCP
    directory (``.metadata``), a zip or legacy ``torch.save`` file, a
    safetensors file. A destination (``role="destination"``) by its name: a
    ``.safetensors`` file, a ``.pt``/``.pth``/``.bin``/``.ckpt`` file, an
    existing checkpoint directory by its content; any other path is a
    zarrckpt checkpoint, or a DCP directory when the source is a zarrckpt
    checkpoint.

    On an object store (``storage_options`` configure the client of an
    ``s3://``, ``az://`` or ``memory://`` URL) the same rules hold: a prefix
    holding a zarrckpt checkpoint (its commit marker or root ``zarr.json``) or
    DCP's ``.metadata`` object, an object named ``.safetensors`` or
    ``.pt``/``.pth``/``.bin``/... , or else one recognized by its first bytes
    (one ranged GET).

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        A source that does not exist or is of no known format.
    """
    p = os.fspath(path)
    if storage_options is not None and is_object_url(p):
        p = check_path(p, role=role, storage_options=storage_options)
    lower = p.lower().rstrip("/")
    if role == "destination":
        if lower.endswith(".safetensors"):
            return "safetensors"
        if lower.endswith(_TORCH_SUFFIXES):
            return "torch"
        found = _checkpoint_format(p)
        if found is not None:
            return found
        return "dcp" if src_format == "zarrckpt" else "zarrckpt"
    if is_object_url(p):
        return _object_format(p, lower)
    found = _checkpoint_format(p)
    if found is not None:
        return found
    if is_dir(p):
        raise CheckpointNotFoundError(
            f"{p!r} is a directory but neither a zarrckpt checkpoint nor a DCP checkpoint "
            "(no zarr.json manifest, no .metadata)"
        )
    if not is_file(p):
        raise CheckpointNotFoundError(f"no file or directory at {p!r}")
    if lower.endswith(".safetensors"):
        return "safetensors"
    if is_zip_file(p) or lower.endswith(_TORCH_SUFFIXES):
        return "torch"
    if _looks_like_safetensors(p):
        return "safetensors"
    raise CheckpointNotFoundError(
        f"cannot tell the format of {p!r}: not a zip torch.save file, not a safetensors file "
        "(pass src_format / --from)"
    )


def _checkpoint_format(p: str) -> str | None:
    """``"zarrckpt"`` for a zarrckpt checkpoint directory or prefix, ``"dcp"`` for a
    DCP directory or prefix, else None."""
    if is_object_url(p):
        entry = probe(p)
        if entry.zarrckpt:
            return "zarrckpt"
        return "dcp" if entry.dcp else None
    if is_dir(p):
        if open_store(p).looks_like_checkpoint():
            return "zarrckpt"
        if is_dcp_dir(p):
            return "dcp"
    return None


def _object_format(p: str, lower: str) -> str:
    """The format of the source ``p``, an object-store URL (one listing and HEAD)."""
    entry = probe(p)
    if entry.zarrckpt:
        return "zarrckpt"
    if entry.dcp:
        return "dcp"
    if entry.kind == "missing":
        raise CheckpointNotFoundError(f"no object and no object below {str(p)!r}")
    if entry.kind == "prefix":
        raise CheckpointNotFoundError(
            f"{str(p)!r} is a prefix but neither a zarrckpt checkpoint nor a DCP checkpoint "
            "(no zarr.json manifest, no .metadata object below it)"
        )
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith(_TORCH_SUFFIXES):
        return "torch"
    head = remote_head(p, 9)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= entry.size:
        return "safetensors"
    raise CheckpointNotFoundError(
        f"cannot tell the format of {str(p)!r}: not a zip torch.save file, not a safetensors "
        "file (pass src_format / --from)"
    )


def _accepts(func: Callable[..., Any]) -> set[str]:
    import inspect

    return {
        name
        for name, p in inspect.signature(func).parameters.items()
        if p.kind == p.KEYWORD_ONLY and name != "progress"
    }


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> ConvertResult:
    """Convert between any two formats (see :data:`FORMATS`), inferring them from the paths.

    A conversion between two formats other than zarrckpt goes through a
    temporary zarrckpt checkpoint (created beside ``dst``, removed afterwards),
    so it streams as well; its progress counts both passes.

    Parameters
    ----------
    src, dst
        Source and destination paths.
    src_format, dst_format
        Override :func:`detect_format`.
    progress
        As for :func:`from_torch_save`.
    options
        Keyword options of the converters used (e.g. ``overwrite``,
        ``allow_pickle``, ``fsync``, ``chunk_bytes``, ``threads``, ``verify``,
        ``metadata``), each passed to those that accept it; an option that
        none of them accepts raises. ``storage_options`` configure the
        client for whichever side is an object-store URL (both, when both
        are). A torch.save, safetensors or DCP side on an object store is
        downloaded into (or written into, then uploaded from) a temporary
        directory in ``TMPDIR``, which needs room for it
        (docs/object-storage.md, "Converting files on object stores").

    Returns
    -------
    ConvertResult
        With the formats actually used.

    Raises
    ------
    ValueError
        Unknown format names, an option that does not apply, or ``src`` and
        ``dst`` of the same format.
    """
    storage_options = options.pop("storage_options", None)
    s, d = check_paths(src, dst, storage_options)
    sf = src_format or detect_format(s)
    df = dst_format or detect_format(d, role="destination", src_format=sf)
    for name in (sf, df):
        if name not in FORMATS:
            raise ValueError(f"unknown format {name!r}; expected one of {FORMATS}")
    if sf == df:
        raise ValueError(
            f"{s!r} and {d!r} are both {sf}; nothing to convert (pass dst_format / --to)"
        )
    from_funcs: dict[str, Callable[..., ConvertResult]] = {
        "torch": from_torch_save,
        "dcp": from_dcp,
        "safetensors": from_safetensors,
    }
    to_funcs: dict[str, Callable[..., ConvertResult]] = {
        "torch": to_torch_save,
        "dcp": to_dcp,
        "safetensors": to_safetensors,
    }
    steps: list[Callable[..., ConvertResult]] = []
    if sf != "zarrckpt":
        steps.append(from_funcs[sf])
    if df != "zarrckpt":
        steps.append(to_funcs[df])
    accepted = set().union(*(_accepts(f) for f in steps))
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"options {sorted(unknown)} do not apply to {sf} -> {df}")

    def pick(func: Callable[..., Any]) -> dict[str, Any]:
        names = _accepts(func)
        return {k: v for k, v in options.items() if k in names}

    if len(steps) == 1:
        return steps[0](s, d, progress=progress, **pick(steps[0]))
    # two passes through a temporary zarrckpt checkpoint beside the destination
    # (in TMPDIR for a destination on an object store, checked first)
    if is_object_url(d):
        what = {"torch": "torch.save file", "safetensors": "safetensors file"}.get(
            df, "DCP checkpoint"
        )
        check_destination(
            d, what, overwrite=bool(options.get("overwrite")), directory=df == "dcp"
        )
        scratch: Any = scratch_dir()
    else:
        make_parents(d)
        scratch = StagedOutput(d)
    with scratch as staged:
        if isinstance(staged, StagedOutput):
            tmp = staged.path("ckpt")
        else:
            tmp = os.path.join(staged, "ckpt")

        def phase1(bd: int, bt: int, td: int, tt: int) -> None:
            if progress is not None:
                progress(bd, 2 * bt, td, 2 * tt)

        def phase2(bd: int, bt: int, td: int, tt: int) -> None:
            if progress is not None:
                progress(bt + bd, 2 * bt, tt + td, 2 * tt)

        first_options = pick(steps[0])
        first_options.update(overwrite=False, fsync=False)
        first = steps[0](s, tmp, progress=phase1, **first_options)
        steps[1](tmp, d, progress=phase2, **pick(steps[1]))
        return ConvertResult(s, d, sf, df, first.tensors, first.nbytes)
