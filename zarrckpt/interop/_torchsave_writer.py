"""Write a ``torch.save`` file whose tensors are streamed in one slab at a time.

``torch.save`` pickles the whole object and then copies every storage from
memory into the zip archive: all tensors must be resident at once. This
writer produces the same file format without that requirement:

1. the object is pickled exactly as ``torch.save`` pickles it (protocol 2,
   tensors as ``torch._utils._rebuild_tensor_v2`` / ``_v3`` calls whose
   storages are persistent ids ``("storage", type, key, "cpu", numel)``),
   but each tensor is a placeholder carrying only its dtype and shape;
2. PyTorch's own archive writer (``torch._C.PyTorchFileWriter``, the one
   ``torch.save`` uses) writes ``data.pkl``, the version records and, for each
   placeholder storage, a record of the right size and alignment whose bytes
   are left empty (as ``torch.serialization.skip_data`` does);
3. the caller then streams each storage's bytes into its record, slab by
   slab, and the CRC-32 of each record is patched into its local header and
   its central-directory entry, so the archive is a valid zip.

The file is written under a temporary name beside the destination and
renamed into place once complete.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedValueError
from ..storage._files import PositionalFile, open_read
from ._staged import StagedOutput, check_output_file

__all__ = [
    "EmptyBytes",
    "decode_for_pickle",
    "TensorStub",
    "StorageStub",
    "TorchSaveWriter",
]

_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL
_ALIGNMENT = 64


class StorageStub:
    """A storage whose bytes will be streamed in after the archive is laid out."""

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.key: str | None = None


class TensorStub:
    """Pickles as a contiguous CPU tensor of ``dtype`` and ``shape`` over its storage stub."""

    def __init__(self, storage: StorageStub, shape: tuple[int, ...]) -> None:
        self.storage = storage
        self.shape = tuple(shape)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        stride: list[int] = []
        acc = 1
        for size in reversed(self.shape):
            stride.append(acc)
            acc *= max(size, 1)
        stride.reverse()
        args: tuple[Any, ...] = (
            self.storage,
            0,
            self.shape,
            tuple(stride),
            False,
            OrderedDict(),
        )
        if self.storage.dtype in torch.storage._new_dtypes():
            return (torch._utils._rebuild_tensor_v3, (*args, self.storage.dtype))
        return (torch._utils._rebuild_tensor_v2, args)


def _storage_type(dtype: torch.dtype) -> Any:
    if dtype in torch.storage._new_dtypes():
        return torch.storage.UntypedStorage
    name = torch.storage._dtype_to_storage_type_map()[dtype]
    return getattr(torch, name)


class EmptyBytes:
    """Pickles as ``b""`` in a form ``torch.load(weights_only=True)`` accepts.

    Protocol 2 pickles ``b""`` as a call of the global ``bytes``, which the
    weights-only unpickler refuses (a ``torch.save`` file holding ``b""`` needs
    ``weights_only=False``); non-empty bytes are ``_codecs.encode(text, "latin1")``
    calls, which it accepts, and so is this.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        import codecs

        return codecs.encode, ("", "latin1")


def decode_for_pickle(node: dict[str, Any], resolve: Callable[[str, str], Any]) -> Any:
    """:func:`~zarrckpt.format._flatten.decode_plain` for a value about to be ``torch.save``'d:
    ``b""`` becomes :class:`EmptyBytes`, so ``torch.load(weights_only=True)`` reads it."""
    from ..format._flatten import decode_bytes, decode_plain

    def on_bytes(node: dict[str, Any]) -> Any:
        value = decode_bytes(node, resolve)
        return EmptyBytes() if type(value) is bytes and not value else value

    return decode_plain(node, resolve, on_bytes=on_bytes)


class _Pickler(pickle.Pickler):
    """``torch.save``'s pickler: storages (stubs or real ones) become persistent ids."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        #: key -> storage stub or real untyped storage, in first-seen order
        self.storages: dict[str, Any] = {}
        self._keys: dict[int, str] = {}

    def _key(self, ident: int, storage: Any) -> str:
        key = self._keys.get(ident)
        if key is None:
            key = self._keys[ident] = str(len(self._keys))
            self.storages[key] = storage
        return key

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageStub):
            key = self._key(id(obj), obj)
            obj.key = key
            if obj.dtype in torch.storage._new_dtypes():
                return ("storage", torch.storage.UntypedStorage, key, "cpu", obj.nbytes)
            return ("storage", _storage_type(obj.dtype), key, "cpu", obj.numel)
        # real tensors inside pickled objects: as torch.save does it
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            key = self._key(storage._cdata, storage)
            return (
                "storage",
                getattr(torch, obj._pickle_storage_type()),
                key,
                torch.serialization.location_tag(storage),
                obj._size(),
            )
        if torch.is_storage(obj):
            key = self._key(obj._cdata, obj)
            return (
                "storage",
                torch.serialization.normalize_storage_type(type(obj)),
                key,
                torch.serialization.location_tag(obj),
                obj.nbytes(),
            )
        return None


_ARCHIVE = "archive"


class TorchSaveWriter:
    """A ``torch.save`` file under construction.

    Parameters
    ----------
    path
        Destination file.
    overwrite
        Replace an existing file at ``path`` (atomically, by rename).
    fsync
        Make the file durable before it is renamed into place.
    """

    def __init__(self, path: str, *, overwrite: bool, fsync: bool) -> None:
        self.path = path
        self.fsync = fsync
        check_output_file(path, overwrite, "torch.save file")
        self._staged = StagedOutput(path)
        # an ASCII name inside the staging directory: PyTorchFileWriter needs one, and
        # the archive's record prefix is the file's stem ("archive", as for a buffer)
        self.tmp_path = self._staged.path(_ARCHIVE)
        self._records: dict[str, StorageStub] = {}
        self._file: PositionalFile | None = None

    def __enter__(self) -> TorchSaveWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._staged.abort()

    def layout(self, obj: Any) -> list[StorageStub]:
        """Lay out the archive of ``obj`` with empty stub records; return the stubs in order."""
        buffer = io.BytesIO()
        pickler = _Pickler(buffer)
        try:
            pickler.dump(obj)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise UnsupportedValueError(
                f"cannot write torch.save file {self.path!r}: a value cannot be pickled ({e})"
            ) from e
        data = buffer.getvalue()
        writer = torch._C.PyTorchFileWriter(self.tmp_path, True, _ALIGNMENT)
        writer.write_record("data.pkl", data, len(data))
        alignment = str(_ALIGNMENT).encode()
        byteorder = sys.byteorder.encode()
        writer.write_record(".format_version", b"1", 1)
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", byteorder, len(byteorder))
        stubs: list[StorageStub] = []
        for key, storage in pickler.storages.items():
            name = f"data/{key}"
            if isinstance(storage, StorageStub):
                # reserves the record (size and alignment) without writing its bytes
                writer.write_record_metadata(name, storage.nbytes)  # type: ignore[attr-defined]
                self._records[name] = storage
                stubs.append(storage)
            else:
                writer.write_record(name, storage.cpu(), storage.nbytes())
        writer.write_end_of_file()
        del writer
        return stubs

    def fill(
        self,
        stubs: list[StorageStub],
        source: Callable[[StorageStub], Iterator[np.ndarray]],
    ) -> None:
        """Stream every stub's bytes (``source(stub)`` yields them in order) into its record."""
        with open_read(self.tmp_path) as f, zipfile.ZipFile(f) as zf:
            infos = {i.filename.split("/", 1)[1]: i for i in zf.infolist()}
            start_dir = zf.start_dir
        self._file = fd = PositionalFile(self.tmp_path)
        crcs: dict[str, int] = {}
        for stub in stubs:
            name = f"data/{stub.key}"
            info = infos[name]
            header = fd.pread(30, info.header_offset)
            n, m = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + n + m
            crc = 0
            written = 0
            for part in source(stub):
                data = part.reshape(-1).view(np.uint8)
                if written + data.nbytes > stub.nbytes:
                    raise UnsupportedValueError(
                        f"internal error: more bytes than record {name!r} holds"
                    )
                fd.pwrite_all(data, offset + written)
                crc = zlib.crc32(data.data, crc)
                written += data.nbytes
            if written != stub.nbytes:
                raise UnsupportedValueError(
                    f"internal error: record {name!r} got {written} of {stub.nbytes} bytes"
                )
            crcs[info.filename] = crc
            fd.pwrite_all(struct.pack("<I", crc), info.header_offset + 14)
        self._patch_central_directory(fd, start_dir, crcs)

    def _patch_central_directory(
        self, fd: PositionalFile, start: int, crcs: dict[str, int]
    ) -> None:
        pos = start
        left = dict(crcs)
        while left:
            header = fd.pread(46, pos)
            if len(header) < 46 or header[:4] != b"PK\x01\x02":
                raise UnsupportedValueError(
                    f"internal error: central directory of {self.tmp_path!r} not understood"
                )
            n, m, k = struct.unpack("<HHH", header[28:34])
            name = fd.pread(n, pos + 46).decode("utf-8")
            if name in left:
                fd.pwrite_all(struct.pack("<I", left.pop(name)), pos + 16)
            pos += 46 + n + m + k

    def publish(self) -> None:
        """Make the file durable (if asked) and rename it to its destination."""
        synced = False
        if self._file is not None:
            if self.fsync:
                self._file.fsync()
            self._file.close()
            self._file = None
            synced = True
        self._staged.publish_file(_ARCHIVE, fsync=self.fsync, synced=synced)
