"""Single files as sources of :func:`zarrckpt.load`: ``torch.save`` and safetensors.

``zarrckpt.load(state_dict, "model.pt")`` plans and applies the load exactly
as for a checkpoint directory (:class:`~zarrckpt.parallel._load.LoadPlan`); only the
object that serves the reads differs. Each rank memory-maps the file and
copies the slices its target tensors hold, so a sharded model (FSDP2 /
DTensor, FSDP1 ``ShardedTensor``, TP) is loaded without any rank reading or
broadcasting whole tensors it does not hold.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ..errors import CorruptCheckpointError
from ..format._dtypes import numpy_as_tensor
from ..format._flatten import FlatState
from ..storage._files import is_zip_file, read_head
from ..storage._local import is_object_url
from ..storage._remote_files import object_version
from ..storage._remote_files import read_head as read_remote_head
from ._remote_copy import local_copy
from ._safetensors_io import SafetensorsReader, read_layout
from ._safetensors_remote import RemoteSafetensorsFile
from ._torchsave_source import FileSource, TorchSaveFile

__all__ = ["SafetensorsFile", "TorchSaveFile", "open_file_source"]


class SafetensorsFile(FileSource):
    """A safetensors file as a source for :func:`zarrckpt.load` (memory-mapped).

    Tensors are offered under their names, or with the nesting and plain
    values recorded by :func:`zarrckpt.convert.to_safetensors`.
    """

    def __init__(self, path: str) -> None:
        self._reader = SafetensorsReader(path)
        tree, _record, complex_names = read_layout(self._reader)
        tensors: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only map: never written
            for name, e in self._reader.entries.items():
                array = self._reader.array(e)
                dtype = e.dtype
                if name in complex_names:
                    array = array.view(np.complex128).reshape(e.shape[:-1])
                    dtype = torch.complex128
                tensors[name] = numpy_as_tensor(array, dtype)
        super().__init__(path, FlatState(tree, tensors, {}), unsafe=False)


def _head(path: str, n: int = 32) -> bytes:
    try:
        return read_head(path, n)
    except OSError:
        return b""


def _is_safetensors(path: str) -> bool:
    if path.lower().endswith(".safetensors"):
        return True
    head = _head(path, 9)
    return len(head) == 9 and head[8:9] == b"{"


#: torch.serialization.MAGIC_NUMBER as pickled (LONG1) at the start of a legacy torch.save file
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _is_legacy_torch_save(path: str) -> bool:
    """A pre-1.6 (non-zip) torch.save file: a pickle starting with torch's magic number."""
    head = _head(path)
    return head[:1] == b"\x80" and _LEGACY_MAGIC in head


def _open_remote(url: str, *, allow_pickle: bool) -> Any:
    """The load source for an object: a safetensors object read by ranged GETs, a
    torch.save object through a local copy (``torch.load`` maps a local file), which
    is deleted once mapped (the map keeps its pages)."""
    head = read_remote_head(url, 32)
    if url.lower().endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        return RemoteSafetensorsFile(url)
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and _LEGACY_MAGIC in head):
        version = object_version(url)
        with local_copy(url, prefix="zarrckpt-load-", e_tag=version) as local:
            source = TorchSaveFile(local, allow_pickle=allow_pickle)
        source.path = url
        source.version = version  # the object's, not the local copy's
        return source
    raise CorruptCheckpointError(
        f"{url!r} is an object but neither a torch.save file nor a safetensors file (it "
        f"starts with bytes {head[:8].hex(' ') or '(none: it is empty)'}; or it is "
        "damaged), and a zarrckpt checkpoint is a prefix: zarrckpt.load reads those three"
    )


def open_file_source(path: str, *, allow_pickle: bool) -> Any:
    """The load source for a single file (or object-store object): a ``torch.save``
    file or a safetensors file.

    Raises
    ------
    zarrckpt.errors.CorruptCheckpointError
        The file is neither.
    """
    if is_object_url(path):
        return _open_remote(path, allow_pickle=allow_pickle)
    if is_zip_file(path):
        return TorchSaveFile(path, allow_pickle=allow_pickle)
    if _is_safetensors(path):
        return SafetensorsFile(path)
    if _is_legacy_torch_save(path):
        return TorchSaveFile(path, allow_pickle=allow_pickle)
    head = _head(path, 8)
    raise CorruptCheckpointError(
        f"{path!r} is a file but neither a torch.save file nor a safetensors file (it "
        f"starts with bytes {head.hex(' ') or '(none: it is empty)'}; or it is damaged), "
        "and a zarrckpt checkpoint is a directory: zarrckpt.load reads those three"
    )
