"""Storage fault injection through the storage interface (zarrckpt/storage/_base.py).

:func:`inject` wraps every store that ``zarrckpt.storage._local.open_store``
opens (its ``STORE_WRAPPERS`` hook) in a :class:`FaultyStore`, which hands out
:class:`FaultyStaging` and :class:`FaultyReader` wrappers, so that any backend
behind the interface sees the same faults. From the ``nth`` operation of one
kind on (a full disk stays full), the wrapper raises ``OSError`` with the
injected errno, naming the object like a backend would, instead of calling
the wrapped store. Kinds of operation:

``write``
    ``Staging.ensure_dir/write_small/write_chunk/write_at/write_json``.
``sync``
    ``Staging.sync``.
``publish``
    ``Staging.commit/publish/publish_file``.
``read``
    ``Store.open_reader`` and ``RangeReader.readv_into`` (chunk data).
``read_small``
    ``Store.read_small`` and ``Staging.read_small`` (metadata documents).

The fault ``"short"`` is a short write (the first half of the bytes reach the
store, then ``ENOSPC``) for ``write``, and short reads for ``read`` (each
``readv_into`` returns at most half of what was asked, which the interface
allows: the caller must read the rest).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from zarrckpt.storage import _local
from zarrckpt.storage._base import Kind, RangeReader, Staging, Store

ERRNOS = {
    "ENOSPC": errno.ENOSPC,
    "EIO": errno.EIO,
    "EACCES": errno.EACCES,
    "EROFS": errno.EROFS,
}
FAULTS = (*ERRNOS, "short")
OPS = ("write", "sync", "publish", "read", "read_small")


@dataclass
class Injector:
    """Counts operations of kind ``op`` and fails them from the ``nth`` on."""

    op: str
    fault: str
    nth: int = 1
    count: int = 0
    #: where a fault was injected (locations), in order
    fired: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def errno(self) -> int:
        return ERRNOS.get(self.fault, errno.ENOSPC)

    def due(self, op: str, where: str) -> bool:
        """Count one ``op`` at ``where``; True when it must fail."""
        if op != self.op:
            return False
        with self._lock:
            self.count += 1
            if self.count < self.nth:
                return False
            self.fired.append(where)
            return True

    def error(self, where: str) -> OSError:
        return OSError(self.errno, os.strerror(self.errno), where)

    def check(self, op: str, where: str) -> None:
        """Raise the injected error if this ``op`` must fail (a short write does
        its partial write itself, see :class:`FaultyStaging`)."""
        if self.due(op, where):
            raise self.error(where)


def _halves(buffers: list[Any]) -> list[memoryview]:
    """The first half of the bytes of ``buffers``."""
    views = [memoryview(b).cast("B") for b in buffers]
    left = sum(len(v) for v in views) // 2
    out = []
    for v in views:
        if left <= 0:
            break
        out.append(v[:left])
        left -= len(out[-1])
    return out


class FaultyReader(RangeReader):
    def __init__(self, inner: RangeReader, injector: Injector, where: str) -> None:
        self.inner, self.injector, self.where = inner, injector, where

    @property
    def size(self) -> int:
        return self.inner.size

    def readv_into(self, buffers: list[memoryview], offset: int) -> int:
        inj = self.injector
        if inj.fault == "short" and inj.due("read", self.where):
            want = sum(len(b) for b in buffers)
            part = max(1, want // 2)
            short: list[memoryview] = []
            for b in buffers:
                b = memoryview(b).cast("B")
                if part <= 0:
                    break
                short.append(b[:part])
                part -= len(short[-1])
            return self.inner.readv_into(short, offset)
        if inj.fault != "short":
            inj.check("read", self.where)
        return self.inner.readv_into(buffers, offset)

    def close(self) -> None:
        self.inner.close()


class FaultyStaging(Staging):
    def __init__(self, inner: Staging, injector: Injector) -> None:
        self.inner, self.injector = inner, injector

    def _where(self, key: str) -> str:
        return f"{self.inner.local_dir}/{key}"

    def _write(self, key: str) -> bool:
        """Check a write of ``key``: raise, or True for a short write to do."""
        inj = self.injector
        if not inj.due("write", self._where(key)):
            return False
        if inj.fault == "short":
            return True
        raise inj.error(self._where(key))

    @property
    def token(self) -> str:
        return self.inner.token

    @property
    def local_dir(self) -> str:
        return self.inner.local_dir

    def ensure_dir(self, key: str) -> None:
        if self._write(key):
            raise self.injector.error(self._where(key))
        self.inner.ensure_dir(key)

    def write_small(self, key: str, data: bytes) -> None:
        if self._write(key):
            self.inner.write_small(key, data[: len(data) // 2])
            raise self.injector.error(self._where(key))
        self.inner.write_small(key, data)

    def write_chunk(self, key: str, buffers: list[Any], *, writeback: bool = False) -> int:
        if self._write(key):
            self.inner.write_chunk(key, _halves(buffers))
            raise self.injector.error(self._where(key))
        return self.inner.write_chunk(key, buffers, writeback=writeback)

    def write_chunk_at(
        self, key: str, offset: int, buffers: list[Any], *, writeback: bool = False
    ) -> int:
        if self._write(key):
            self.inner.write_chunk_at(key, offset, _halves(buffers))
            raise self.injector.error(self._where(key))
        return self.inner.write_chunk_at(key, offset, buffers, writeback=writeback)

    def write_json(self, key: str, document: Any, *, fsync: bool = False) -> bytes:
        if self._write(key):
            text = json.dumps(document).encode()
            self.inner.write_small(key, text[: len(text) // 2])
            raise self.injector.error(self._where(key))
        return self.inner.write_json(key, document, fsync=fsync)

    def read_small(self, key: str) -> bytes:
        self.injector.check("read_small", self._where(key))
        return self.inner.read_small(key)

    def sync(self) -> None:
        self.injector.check("sync", self.inner.local_dir)
        self.inner.sync()

    def commit(
        self, root: dict[str, Any], checkpoint_id: str, *, overwrite: bool, fsync: bool
    ) -> None:
        self.injector.check("publish", self.inner.local_dir)
        self.inner.commit(root, checkpoint_id, overwrite=overwrite, fsync=fsync)

    def publish(self, *, overwrite: bool, fsync: bool) -> None:
        self.injector.check("publish", self.inner.local_dir)
        self.inner.publish(overwrite=overwrite, fsync=fsync)

    def publish_file(
        self, name: str, *, overwrite: bool, fsync: bool, synced: bool = False
    ) -> None:
        self.injector.check("publish", self.inner.local_dir)
        self.inner.publish_file(name, overwrite=overwrite, fsync=fsync, synced=synced)

    def abort(self) -> None:
        self.inner.abort()


class FaultyStore(Store):
    """``inner`` with the faults of ``injector``."""

    def __init__(self, inner: Store, injector: Injector) -> None:
        self.inner, self.injector, self.path = inner, injector, inner.path

    def kind(self, key: str = "") -> Kind:
        return self.inner.kind(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list_dir(self, key: str = "") -> list[str]:
        return self.inner.list_dir(key)

    def location(self, key: str = "") -> str:
        return self.inner.location(key)

    def read_small(self, key: str) -> bytes:
        self.injector.check("read_small", self.location(key))
        return self.inner.read_small(key)

    def open_reader(self, key: str) -> RangeReader:
        if self.injector.fault != "short":
            self.injector.check("read", self.location(key))
        return FaultyReader(self.inner.open_reader(key), self.injector, self.location(key))

    def missing_error(self) -> Exception:
        return self.inner.missing_error()

    def not_committed_error(self) -> Exception:
        return self.inner.not_committed_error()

    def read_committed_root(self) -> dict[str, Any]:
        pin = getattr(self.inner, "pin", None)
        if pin is not None:
            pin()  # as the wrapped store would: read the checkpoint now at the path
        return super().read_committed_root()

    def check_writable(self, *, overwrite: bool) -> None:
        self.inner.check_writable(overwrite=overwrite)

    def stage(self, *, overwrite: bool = False) -> Staging:
        return FaultyStaging(self.inner.stage(overwrite=overwrite), self.injector)

    def attach(self, token: str, *, rank: int = 0) -> Staging:
        return FaultyStaging(self.inner.attach(token, rank=rank), self.injector)

    def stale_stagings(self) -> list[str]:
        return self.inner.stale_stagings()

    def remove(self) -> None:
        self.inner.remove()

    def zarr_store(self) -> Any:
        return self.inner.zarr_store()


@contextlib.contextmanager
def inject(op: str, fault: str, nth: int = 1) -> Iterator[Injector]:
    """Fail the ``nth`` and later operations of kind ``op`` of every store opened
    meanwhile (in this process) with ``fault``."""
    assert op in OPS and fault in FAULTS, (op, fault)
    injector = Injector(op, fault, nth)

    def wrap(store: Store) -> Store:
        return FaultyStore(store, injector)

    _local.STORE_WRAPPERS.append(wrap)
    try:
        yield injector
    finally:
        _local.STORE_WRAPPERS.remove(wrap)
