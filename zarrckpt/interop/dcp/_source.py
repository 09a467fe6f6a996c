"""Read ``torch.distributed.checkpoint`` (DCP) directories piece by piece.

A DCP directory written by ``dcp.save`` with ``FileSystemWriter`` holds
``.metadata`` (a *pickle* of DCP's ``Metadata``: every key, every tensor's
global shape, dtype and stored chunks, the flattening mappings and where each
item lies in the ``*.distcp`` files) and the data files, in which every
tensor piece is a ``torch.save`` archive and every other value the
``torch.save`` bytes of the object.

:class:`DcpSource` reads one: ``.metadata`` is unpickled with a restricted
unpickler (:func:`read_metadata`) that constructs only DCP's metadata classes
and the few torch / pathlib types they use; anything else needs
``allow_pickle=True``. Each tensor piece is then loaded on its own with
``torch.load(weights_only=True)`` from its byte range (DCP's own reader does
the same per item), so the memory a conversion needs is one piece, not one
checkpoint, and no process group is involved. Writing is in ``_export``.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ...errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from ...format._codec import crc32c
from ...storage._files import file_size, is_dir, is_file, is_link, open_read, read_bytes
from .._torchsave_source import bytes_allowed
from ._tree import _is_terminal, _key_str, dcp_leaves, tree_from_leaves

__all__ = ["METADATA_FILE", "SIDECAR", "read_metadata", "DcpSource", "is_dcp_dir"]

METADATA_FILE = ".metadata"
#: zarrckpt's record of the exact tree, beside a DCP checkpoint it wrote (DCP ignores it)
SIDECAR = "zarrckpt_tree.json"

_DCP_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED: set[tuple[str, str]] = {
    (_DCP_MD, "Metadata"),
    (_DCP_MD, "TensorStorageMetadata"),
    (_DCP_MD, "BytesStorageMetadata"),
    (_DCP_MD, "ChunkStorageMetadata"),
    (_DCP_MD, "TensorProperties"),
    (_DCP_MD, "MetadataIndex"),
    (_DCP_MD, "StorageMeta"),
    (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


def is_dcp_dir(path: str) -> bool:
    """True for a directory holding DCP's ``.metadata``."""
    return is_file(os.path.join(path, METADATA_FILE))


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            # Python 3.11.0-3.11.4 pickle an enum member as getattr(EnumClass, "NAME")
            return self._enum_member
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise UnsafeCheckpointError(
            f"DCP checkpoint {self.path!r}: its {METADATA_FILE} pickle refers to "
            f"{module}.{name}, which is not one of DCP's metadata types; unpickling it could "
            "run arbitrary code. Pass allow_pickle=True only for checkpoints you trust"
        )


    def _enum_member(self, cls: Any, name: Any) -> Any:
        """``getattr(cls, name)`` restricted to a member of an allowed enum class."""
        allowed = (
            isinstance(cls, type)
            and issubclass(cls, enum.Enum)
            and (cls.__module__, cls.__qualname__) in _ALLOWED
            and isinstance(name, str)
            and name in cls.__members__
        )
        if not allowed:
            raise UnsafeCheckpointError(
                f"DCP checkpoint {self.path!r}: its {METADATA_FILE} pickle calls "
                f"getattr({getattr(cls, '__qualname__', type(cls).__name__)}, {name!r}), which "
                "is not a member of one of DCP's metadata enums; unpickling it could run "
                "arbitrary code. Pass allow_pickle=True only for checkpoints you trust"
            )
        return cls.__members__[name]


def read_metadata(path: str, *, allow_pickle: bool) -> tuple[Any, bytes]:
    """DCP's ``Metadata`` of the checkpoint directory ``path``, and the raw file bytes.

    Without ``allow_pickle`` the pickle is read by a restricted unpickler that
    only constructs DCP's metadata classes (``Metadata``,
    ``TensorStorageMetadata``, ``ChunkStorageMetadata``, ``MetadataIndex``, ...),
    ``torch.Size`` / dtypes / layouts, pathlib paths and builtin containers.

    Raises
    ------
    CheckpointNotFoundError
        No ``.metadata`` in ``path``.
    UnsafeCheckpointError
        The pickle refers to anything else and ``allow_pickle`` is False.
    CorruptCheckpointError
        The file is not a DCP metadata pickle.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    file = os.path.join(path, METADATA_FILE)
    if not is_dir(path) or not is_file(file):
        raise CheckpointNotFoundError(
            f"no DCP checkpoint at {path!r} (expected a directory holding {METADATA_FILE!r})"
        )
    if is_link(file):
        raise CorruptCheckpointError(
            f"DCP checkpoint {path!r}: {METADATA_FILE!r} is a symbolic link; the files of a "
            "DCP checkpoint must be regular files inside its directory"
        )
    raw = read_bytes(file)
    try:
        if allow_pickle:
            metadata = pickle.loads(raw)
        else:
            metadata = _MetadataUnpickler(io.BytesIO(raw), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise CorruptCheckpointError(
            f"DCP checkpoint {path!r}: {METADATA_FILE} cannot be read ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CorruptCheckpointError(
            f"DCP checkpoint {path!r}: {METADATA_FILE} holds a {type(metadata).__name__}, "
            "not DCP Metadata"
        )
    return metadata, raw


class DcpSource:
    """A DCP checkpoint directory opened for piece-by-piece reading.

    Parameters
    ----------
    path
        The DCP directory.
    allow_pickle
        Unpickle ``.metadata`` with plain pickle, and values that
        ``torch.load(weights_only=True)`` refuses.
    """

    def __init__(self, path: str, *, allow_pickle: bool) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        self.allow_pickle = allow_pickle
        self.metadata, raw = read_metadata(path, allow_pickle=allow_pickle)
        self.metadata_crc = crc32c(raw)
        sdm = self.metadata.state_dict_metadata
        planner_data = self.metadata.planner_data
        mappings = planner_data if isinstance(planner_data, dict) else {}
        self.mappings: dict[str, tuple[Any, ...]] = {
            k: tuple(v) for k, v in mappings.items() if isinstance(v, (tuple, list))
        }
        #: keys in state-dict order (the planner's mappings are in insertion order)
        self.keys = [k for k in self.mappings if k in sdm] + [
            k for k in sdm if k not in self.mappings
        ]
        self.tensors: dict[str, Any] = {
            k: sdm[k] for k in self.keys if isinstance(sdm[k], TensorStorageMetadata)
        }
        storage = self.metadata.storage_data
        if not isinstance(storage, dict):
            raise CorruptCheckpointError(
                f"DCP checkpoint {path!r} has no per-item storage records (was it written "
                "by FileSystemWriter?)"
            )
        self._storage: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        for index, info in storage.items():
            offset = None if index.offset is None else tuple(int(o) for o in index.offset)
            self._storage[(index.fqn, offset)] = info
        self._transforms: Any = None

    # ------------------------------------------------------------- raw items
    @contextlib.contextmanager
    def _item(self, fqn: str, offset: tuple[int, ...] | None) -> Iterator[Any]:
        """A seekable stream over the stored bytes of one item (decoded if transformed)."""
        from torch.distributed.checkpoint.utils import _create_file_view

        info = self._storage.get((fqn, offset))
        if info is None:
            raise CorruptCheckpointError(
                f"DCP checkpoint {self.path!r}: no storage record for {fqn!r}"
                + (f" at {list(offset)}" if offset is not None else "")
            )
        root = os.path.realpath(self.path)
        joined = os.path.normpath(os.path.join(root, str(info.relative_path)))
        file = os.path.realpath(joined)
        if os.path.commonpath([root, file]) != root or file != joined:
            raise CorruptCheckpointError(
                f"DCP checkpoint {self.path!r}: item {fqn!r} points outside the checkpoint "
                f"or through a symbolic link ({info.relative_path!r}); the files of a DCP "
                "checkpoint must be regular files inside its directory"
            )
        start, length = int(info.offset), int(info.length)
        try:
            size = file_size(file)
        except OSError:
            raise CorruptCheckpointError(
                f"DCP checkpoint {self.path!r}: data file {info.relative_path!r} of item "
                f"{fqn!r} is missing"
            ) from None
        if start < 0 or length < 0 or start + length > size:
            raise CorruptCheckpointError(
                f"DCP checkpoint {self.path!r}: item {fqn!r} lies at bytes "
                f"[{start}, {start + length}) of {info.relative_path!r}, which has {size}"
            )
        with open_read(file) as f:
            stream: Any = _create_file_view(f, start, length)
            descriptors = getattr(info, "transform_descriptors", None) or ()
            if descriptors:
                from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

                if self._transforms is None:
                    self._transforms = _StorageReaderTransforms()
                stream = self._transforms.transform_load_stream(None, descriptors, stream)
                if not stream.seekable():
                    stream = io.BytesIO(stream.read())
            yield stream

    def read_piece(self, fqn: str, offsets: tuple[int, ...]) -> torch.Tensor:
        """The stored tensor piece of ``fqn`` whose chunk starts at ``offsets``."""
        try:
            with self._item(fqn, offsets) as stream, warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                tensor = torch.load(stream, map_location="cpu", weights_only=True)
        except CorruptCheckpointError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(
                f"DCP checkpoint {self.path!r}: piece of {fqn!r} at {list(offsets)} cannot be "
                f"read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        if not isinstance(tensor, torch.Tensor):
            raise CorruptCheckpointError(
                f"DCP checkpoint {self.path!r}: piece of {fqn!r} holds a "
                f"{type(tensor).__name__}, not a tensor"
            )
        return tensor

    def read_value(self, fqn: str) -> Any:
        """A non-tensor value, ``torch.load``-ed with ``weights_only=True`` unless allowed."""
        with self._item(fqn, None) as stream:
            raw = stream.read()
        try:
            with bytes_allowed():
                return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not self.allow_pickle:
                raise UnsafeCheckpointError(
                    f"DCP checkpoint {self.path!r}: value {fqn!r} holds objects that "
                    f"torch.load(weights_only=True) refuses ({str(e).splitlines()[0]}); "
                    "pass allow_pickle=True only for checkpoints you trust"
                ) from None
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
        except Exception as e:
            raise CorruptCheckpointError(
                f"DCP checkpoint {self.path!r}: value {fqn!r} cannot be read "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None

    # ------------------------------------------------------------------ tree
    def _sidecar(self) -> dict[str, Any]:
        """zarrckpt's record beside the checkpoint, if it was written for this ``.metadata``."""
        file = os.path.join(self.path, SIDECAR)
        try:
            record = json.loads(read_bytes(file).decode("utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict) or record.get("metadata_crc32c") != self.metadata_crc:
            return {}  # written for another save into this directory
        return record

    def sidecar_record(self) -> dict[str, Any]:
        """The conversion record (tied tensors, containers) kept in the sidecar, if valid."""
        if self.sidecar_tree() is None:
            return {}
        record = self._sidecar().get("convert")
        return record if isinstance(record, dict) else {}

    def sidecar_tree(self) -> dict[str, Any] | None:
        """The exact tree zarrckpt recorded when it wrote this checkpoint, if still valid."""
        tree = self._sidecar().get("tree")
        try:
            leaves = dcp_leaves(tree, checkpoint=self.path) if isinstance(tree, dict) else None
        except CorruptCheckpointError:
            return None
        if leaves is None or {leaf.key for leaf in leaves} != set(self.keys):
            return None
        return tree

    def build_tree(self, node_of: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """The state-dict tree, with ``node_of(key)`` as the node of each DCP key."""
        sidecar = self.sidecar_tree()
        if sidecar is not None:
            return _replace_leaves(sidecar, node_of)
        leaves = [(k, self.mappings.get(k, (k,)), node_of(k)) for k in self.keys]
        return tree_from_leaves(leaves, checkpoint=self.path)


def _replace_leaves(
    tree: dict[str, Any], node_of: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """Copy of ``tree`` whose DCP leaves (as :func:`dcp_leaves` finds them) are ``node_of(key)``."""

    def visit(path: tuple[Any, ...], node: dict[str, Any]) -> dict[str, Any]:
        if "stateful" in node:
            return {"stateful": visit(path, node["stateful"])}
        if "dict" in node:
            return {
                "dict": [[k, visit((*path, _key_str(k)), child)] for k, child in node["dict"]]
            }
        if "list" in node and not _is_terminal(node):
            return {"list": [visit((*path, i), child) for i, child in enumerate(node["list"])]}
        return node_of(".".join(map(str, path)))

    return visit((), tree)
