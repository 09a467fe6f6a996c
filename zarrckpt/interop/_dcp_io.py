"""Read and write ``torch.distributed.checkpoint`` (DCP) directories piece by piece.

A DCP directory written by ``dcp.save`` with ``FileSystemWriter`` holds
``.metadata`` (a *pickle* of DCP's ``Metadata``: every key, every tensor's
global shape, dtype and stored chunks, the flattening mappings and where each
item lies in the ``*.distcp`` files) and the data files, in which every
tensor piece is a ``torch.save`` archive and every other value the
``torch.save`` bytes of the object.

Reading (:class:`DcpSource`): ``.metadata`` is unpickled with a restricted
unpickler (:func:`read_metadata`) that constructs only DCP's metadata classes
and the few torch / pathlib types they use; anything else needs
``allow_pickle=True``. Each tensor piece is then loaded on its own with
``torch.load(weights_only=True)`` from its byte range (DCP's own reader does
the same per item), so the memory a conversion needs is one piece, not one
checkpoint, and no process group is involved.

Writing (:func:`save_streaming`): ``dcp.save`` with DCP's own
``FileSystemWriter`` and a planner that plans one DCP chunk per stored zarrckpt
chunk and reads each chunk from the zarrckpt checkpoint only when the writer
asks for it (``resolve_data``), with one writer thread: at most one or two
chunks are in memory at a time, whatever the size of the checkpoint.
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

import numpy as np
import torch

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from ..format._chunkio import crc32c
from ..format._dtypes import numpy_as_tensor
from ..parallel._reader import CheckpointFiles, ReadRequest
from ..storage._paths import make_parents
from ..storage._storage import is_checkpoint_dir, publish, remove_tree
from ._dcp_tree import _is_terminal, _key_str, dcp_leaves, tree_from_leaves, unwrap
from ._torchsave_source import bytes_allowed
from ._torchsave_writer import decode_for_pickle

__all__ = ["METADATA_FILE", "SIDECAR", "read_metadata", "DcpSource", "save_streaming", "is_dcp_dir"]

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
    return os.path.isfile(os.path.join(path, METADATA_FILE))


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
    if not os.path.isdir(path) or not os.path.isfile(file):
        raise CheckpointNotFoundError(
            f"no DCP checkpoint at {path!r} (expected a directory holding {METADATA_FILE!r})"
        )
    with open(file, "rb") as f:
        raw = f.read()
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
        file = os.path.realpath(os.path.join(root, str(info.relative_path)))
        if os.path.commonpath([root, file]) != root:
            raise CorruptCheckpointError(
                f"DCP checkpoint {self.path!r}: item {fqn!r} points outside the checkpoint "
                f"({info.relative_path!r})"
            )
        start, length = int(info.offset), int(info.length)
        try:
            size = os.path.getsize(file)
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
        with open(file, "rb") as f:
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
            with open(file, encoding="utf-8") as f:
                record = json.load(f)
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


# ---------------------------------------------------------------------- writing


def check_dcp_writable(path: str, *, overwrite: bool) -> None:
    """Refuse to replace anything but a DCP or zarrckpt checkpoint or an empty directory."""
    if not os.path.lexists(path):
        make_parents(path)
        return
    if not overwrite:
        raise CheckpointExistsError(
            f"{path!r} already exists; pass overwrite=True to replace it (atomically)"
        )
    if not os.path.isdir(path) or os.path.islink(path):
        raise CheckpointExistsError(f"refusing to overwrite {path!r}: it is not a directory")
    if os.listdir(path) and not (is_dcp_dir(path) or is_checkpoint_dir(path)):
        raise CheckpointExistsError(
            f"refusing to overwrite {path!r}: it is a non-empty directory that is not a "
            "DCP or zarrckpt checkpoint"
        )


class _Value:
    """A non-tensor DCP leaf; its value is built when the writer asks for it."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


def _skeleton(node: dict[str, Any], path: tuple[Any, ...], files: CheckpointFiles) -> Any:
    """The object DCP's flattening turns into exactly the keys of :func:`dcp_leaves`."""
    node = unwrap(node)
    if "dict" in node:
        return {_key_str(k): _skeleton(c, (*path, _key_str(k)), files) for k, c in node["dict"]}
    if "list" in node and not _is_terminal(node):
        return [_skeleton(c, (*path, i), files) for i, c in enumerate(node["list"])]
    if "tensor" in node:
        entry = files.arrays[node["tensor"]]
        return torch.empty(entry.shape, dtype=entry.dtype.torch_dtype, device="meta")
    return _Value(".".join(map(str, path)))


def save_streaming(
    files: CheckpointFiles,
    dst: str,
    *,
    overwrite: bool,
    allow_pickle: bool,
    fsync: bool,
    threads: int,
    record: dict[str, Any] | None = None,
    progress: Callable[[int, bool], None] | None = None,
) -> None:
    """Write the zarrckpt checkpoint ``files`` as a DCP checkpoint directory ``dst``.

    ``record`` (tied tensors, container types) is kept in the sidecar file;
    ``progress(nbytes, tensor_done)`` is called after each chunk is handed to DCP.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    check_dcp_writable(dst, overwrite=overwrite)
    leaves = {leaf.key: leaf for leaf in dcp_leaves(files.tree, checkpoint=files.path)}
    state = _skeleton(files.tree, (), files)
    path = files.path

    def resolve(kind: str, fqn: str) -> Any:
        if kind == "pickle":
            return files.read_pickled(fqn, allow_pickle=allow_pickle)
        if kind == "bytes":
            return files.read_bytes(fqn)
        return files.read_tensor(fqn, threads=threads)

    class StreamingPlanner(DefaultSavePlanner):
        """One write item per stored chunk; data read only in ``resolve_data``."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=True, flatten_sharded_tensors=False)
            self.chunks_left: dict[str, int] = {}

        def create_local_plan(self) -> SavePlan:
            items: list[WriteItem] = []
            for key, obj in self.state_dict.items():
                leaf = leaves.get(key)
                if leaf is None:
                    raise UnsupportedValueError(
                        f"internal error: DCP key {key!r} of {path!r} has no stored value"
                    )
                if not isinstance(obj, torch.Tensor):
                    items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
                    continue
                entry = files.arrays[leaf.node["tensor"]]
                properties = TensorProperties(dtype=entry.dtype.torch_dtype)
                size = torch.Size(entry.shape)
                regions = [entry.layout.chunk_region(i) for i in entry.layout.chunk_indices()]
                if not regions:  # a tensor with a zero dimension: one empty piece
                    regions = [tuple((0, s) for s in entry.shape)]
                kind = WriteItemType.TENSOR if len(regions) == 1 else WriteItemType.SHARD
                self.chunks_left[key] = len(regions)
                for region in regions:
                    offsets = torch.Size([a for a, _ in region])
                    items.append(
                        WriteItem(
                            index=MetadataIndex(key, offsets),
                            type=kind,
                            tensor_data=TensorWriteData(
                                chunk=ChunkStorageMetadata(
                                    offsets=offsets, sizes=torch.Size([b - a for a, b in region])
                                ),
                                properties=properties,
                                size=size,
                            ),
                        )
                    )
            self.plan = SavePlan(items, planner_data=self.mappings)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
            key = write_item.index.fqn
            leaf = leaves[key]
            if write_item.type == WriteItemType.BYTE_IO:
                buffer = io.BytesIO()
                torch.save(decode_for_pickle(leaf.node, resolve), buffer)
                return buffer
            entry = files.arrays[leaf.node["tensor"]]
            assert write_item.tensor_data is not None
            chunk = write_item.tensor_data.chunk
            dest = np.empty(tuple(int(s) for s in chunk.sizes), dtype=entry.dtype.numpy_dtype)
            files.read_many(
                [ReadRequest(entry, dest, tuple(int(o) for o in chunk.offsets))], threads=threads
            )
            self.chunks_left[key] -= 1
            if progress is not None:
                progress(dest.nbytes, self.chunks_left[key] == 0)
            return numpy_as_tensor(dest, entry.dtype.torch_dtype)

    from ..storage._storage import new_staging_dir

    staging = new_staging_dir(dst)
    try:
        writer = FileSystemWriter(
            staging, single_file_per_rank=True, sync_files=fsync, thread_count=1, overwrite=True
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=writer, planner=StreamingPlanner(), no_dist=True)
        with open(os.path.join(staging, METADATA_FILE), "rb") as raw:
            metadata_crc = crc32c(raw.read())
        sidecar: dict[str, Any] = {"metadata_crc32c": metadata_crc, "tree": files.tree}
        if record:
            sidecar["convert"] = record
        with open(os.path.join(staging, SIDECAR), "w", encoding="utf-8") as out:
            json.dump(sidecar, out, ensure_ascii=False)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        publish(staging, dst, overwrite=overwrite, fsync=fsync)
    except BaseException:
        remove_tree(staging)
        raise
