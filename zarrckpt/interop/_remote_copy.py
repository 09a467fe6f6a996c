"""Local copies of foreign files on object stores, for the code that needs a
local path: ``torch.load``'s memory map, DCP's ``FileSystemReader``.

:func:`local_copy` downloads an object (or every object below a prefix) into a
private temporary directory (``tempfile.mkdtemp`` in ``TMPDIR``), yields the
local path and removes the directory on exit, whether the block succeeded or
not. A zarrckpt error raised in the block names the URL instead of the copy,
which is gone by the time anyone reads the message. Used by
:func:`zarrckpt.load` (torch.save objects) and by the converters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ZarrCkptError
from ..storage._files import make_dirs, make_temp_dir
from ..storage._object_config import parse_url
from ..storage._posix import remove_tree
from ..storage._remote_files import download, download_prefix

__all__ = ["copy_name", "local_copy", "name_the_source"]


def copy_name(url: str) -> str:
    """The last component of the URL's key (a local copy keeps the file name: a
    torch.save archive's record prefix comes from it)."""
    key = parse_url(url)[2]
    return key.rsplit("/", 1)[-1] or "object"


def name_the_source(e: ZarrCkptError, local: str, url: str) -> None:
    """Rewrite ``e``'s message so that it names ``url`` where it named its local
    copy ``local``."""
    if e.args and isinstance(e.args[0], str):
        e.args = (f"{e.args[0].replace(local, url)} [read from {url!r}]", *e.args[1:])


@contextmanager
def local_copy(
    url: str, *, prefix: str, directory: bool = False, e_tag: str | None = None
) -> Iterator[str]:
    """A local copy of the object ``url`` (``directory``: of every object below the
    prefix ``url``; ``e_tag``: of that version only) in a new temporary directory
    whose name starts with ``prefix``, removed on exit.

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        Nothing at the URL.
    zarrckpt.errors.IncompleteCheckpointError
        The object (a prefix's object) changed while it was downloaded.
    """
    tmp = make_temp_dir(prefix)
    try:
        local = os.path.join(tmp, copy_name(url))
        if directory:
            make_dirs(local)
            download_prefix(url, None, local)
        else:
            download(url, None, local, e_tag=e_tag)
        try:
            yield local
        except ZarrCkptError as e:
            name_the_source(e, local, url)
            raise
    finally:
        remove_tree(tmp)
