"""An output (a file or a directory) built under a temporary name and renamed into place.

Every writer of a foreign format (a ``torch.save`` file, a safetensors file, a
DCP directory) and the two-pass conversion use the same steps: a hidden
staging directory beside the destination (the name :func:`zarrckpt.save`
uses), the output written inside it, made durable, then renamed to the
destination and the parent directory made durable. A writer that fails or is
interrupted leaves the destination as it was: the staging directory is
removed on the way out.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import CheckpointExistsError
from ..storage._files import is_dir
from ..storage._local import open_store

__all__ = ["StagedOutput", "check_output_file"]


def check_output_file(path: str, overwrite: bool, what: str) -> None:
    """Refuse a directory, or an existing file without ``overwrite``, as the file ``path``."""
    if is_dir(path):
        raise CheckpointExistsError(f"cannot write {what} {path!r}: it is a directory")
    open_store(path).check_writable(overwrite=overwrite)


class StagedOutput:
    """A staging directory beside ``dst``; use as a context manager.

    Leaving the block removes the staging directory, unless :meth:`publish_dir`
    moved it to ``dst``.
    """

    def __init__(self, dst: str) -> None:
        self.dst = dst
        self.staging = open_store(dst).stage()
        #: a real local directory: the foreign writers (torch, safetensors, DCP) write there
        self.dir = self.staging.local_dir
        self._published = False

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.abort()

    def path(self, name: str) -> str:
        """Path of the member ``name`` of the staging directory."""
        return os.path.join(self.dir, name)

    def publish_file(self, name: str, *, fsync: bool, synced: bool = False) -> None:
        """Make the member ``name`` durable (if asked; ``synced``: it already is) and
        rename it to ``dst``."""
        # the destination was checked (check_output_file) before the writing began;
        # an already durable member is not synced a second time
        self.staging.publish_file(name, overwrite=True, fsync=fsync, synced=synced)
        self._published = True

    def publish_dir(self, *, overwrite: bool, fsync: bool) -> None:
        """Move the whole staging directory to ``dst`` (atomically, see
        :meth:`zarrckpt.storage._base.Staging.publish`)."""
        self.staging.publish(overwrite=overwrite, fsync=fsync)
        self._published = True

    def abort(self) -> None:
        """Remove the staging directory and what is left in it."""
        if not self._published:
            self.staging.abort()
