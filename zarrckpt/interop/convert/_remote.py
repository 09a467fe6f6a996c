"""torch.save, safetensors and DCP files on object stores: local copies for the converters.

The converters read and write these formats through local files (memory maps,
writes at byte offsets, DCP's ``FileSystemWriter``), so a remote side goes
through a private temporary directory (``tempfile.mkdtemp`` in ``TMPDIR``),
removed when the conversion ends, whether it succeeded or not:

* :func:`local_source`: the object (or DCP prefix) is downloaded there, then
  converted by the local code with all its checks (no pickle, zip CRCs, ...);
* :func:`local_destination`: the destination is checked first (an existing one
  without ``overwrite`` raises before anything is converted or uploaded), the
  local writer writes there, then the result is uploaded (a DCP directory's
  ``.metadata`` last).

Local paths pass through both unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidPathError
from ...storage._files import make_temp_dir
from ...storage._local import is_object_url, open_store
from ...storage._paths import check_path
from ...storage._posix import remove_tree
from ...storage._remote_files import (
    check_dir_destination,
    check_file_destination,
    upload,
    upload_dir,
)
from .._remote_copy import copy_name, local_copy

__all__ = [
    "LocalOutput",
    "check_destination",
    "check_paths",
    "local_destination",
    "local_source",
    "scratch_dir",
]

_TMP_PREFIX = "zarrckpt-convert-"


def check_paths(src: Any, dst: Any, storage_options: dict[str, Any] | None) -> tuple[str, str]:
    """The checked source and destination; ``storage_options`` configure whichever
    of them is an object-store URL (both, when both are), and are refused when
    neither is."""
    s, d = os.fspath(src), os.fspath(dst)
    remote = [isinstance(x, str) and is_object_url(x) for x in (s, d)]
    if storage_options is not None and not any(remote):
        raise InvalidPathError(
            f"storage_options were given, but neither {s!r} nor {d!r} is an object-store URL: "
            "they apply only to object-store URLs (s3://...); leave storage_options=None"
        )
    return (
        check_path(s, role="source", storage_options=storage_options if remote[0] else None),
        check_path(d, role="destination", storage_options=storage_options if remote[1] else None),
    )


@contextmanager
def local_source(
    path: str, *, directory: bool = False, checkpoint: str | None = None, overwrite: bool = False
) -> Iterator[str]:
    """A local path holding the source ``path``: ``path`` itself, or a downloaded copy
    of the object (``directory``: of every object below the prefix) in a temporary
    directory removed on exit. Before a download, the zarrckpt ``checkpoint`` to be
    written is checked (as its writer will: it must not exist unless ``overwrite``).

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        Nothing at the URL.
    zarrckpt.errors.CheckpointExistsError
        ``checkpoint`` exists and ``overwrite`` is False.
    """
    if not is_object_url(path):
        yield path
        return
    if checkpoint is not None:
        open_store(checkpoint).check_writable(overwrite=overwrite)
    with local_copy(path, prefix=_TMP_PREFIX, directory=directory) as local:
        yield local


def check_destination(path: str, what: str, *, overwrite: bool, directory: bool) -> None:
    """Refuse the object-store destination ``path`` of the file (or ``directory``)
    ``what`` when it exists and ``overwrite`` is False, or is of the wrong kind."""
    check = check_dir_destination if directory else check_file_destination
    check(path, None, overwrite=overwrite, what=what)


@contextmanager
def scratch_dir() -> Iterator[str]:
    """A private temporary directory (in ``TMPDIR``), removed on exit."""
    tmp = make_temp_dir(_TMP_PREFIX)
    try:
        yield tmp
    finally:
        remove_tree(tmp)


@dataclass(frozen=True)
class LocalOutput:
    """Where a local writer writes: ``path``, with ``overwrite`` and ``fsync`` as it
    should use them (a fresh temporary path needs neither)."""

    path: str
    overwrite: bool
    fsync: bool


@contextmanager
def local_destination(
    path: str, what: str, *, overwrite: bool, fsync: bool, directory: bool = False
) -> Iterator[LocalOutput]:
    """Where to write the destination ``path``: ``path`` itself, or a path in a
    temporary directory whose contents are uploaded to the URL when the block ends
    without error (then, or on error, the directory is removed).

    Raises
    ------
    zarrckpt.errors.CheckpointExistsError
        (On entry, before anything is written.) The URL exists and ``overwrite`` is
        False, or it is of the wrong kind (an object for a directory, a prefix
        holding objects for a file).
    """
    if not is_object_url(path):
        yield LocalOutput(path, overwrite, fsync)
        return
    check_destination(path, what, overwrite=overwrite, directory=directory)
    tmp = make_temp_dir(_TMP_PREFIX)
    try:
        local = os.path.join(tmp, copy_name(path))
        yield LocalOutput(local, False, False)
        if directory:
            upload_dir(local, path, None, overwrite=overwrite)
        else:
            upload(local, path, None, overwrite=overwrite)
    finally:
        remove_tree(tmp)
