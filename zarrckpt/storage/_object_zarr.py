"""zarr-python stores of object-store checkpoints (``zarrckpt.open(url)[key]``).

An S3 or Azure checkpoint is read through ``zarr.storage.ObjectStore`` on an
obstore store rooted at the checkpoint's prefix. obstore's ``MemoryStore``
(``memory://``) has no prefix, so its view is a :class:`PrefixStore`: the
process's one in-memory store with every key below the checkpoint's prefix.
Imported only when a zarr view is made (it needs zarr).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable
from typing import Any

from zarr.storage import ObjectStore as ZarrObjectStore
from zarr.storage import WrapperStore

from ._object_config import build_client, parse_url

__all__ = ["PrefixStore", "zarr_object_store"]


def zarr_object_store(url: str, storage_options: dict[str, Any] | None) -> Any:
    """A read-only zarr-python store whose keys are relative to ``url``'s prefix."""
    scheme, _bucket, prefix = parse_url(url)
    if scheme == "memory":
        whole = ZarrObjectStore(build_client(url, storage_options), read_only=True)
        return PrefixStore(whole, prefix)
    return ZarrObjectStore(build_client(url, storage_options, rooted=True), read_only=True)


class PrefixStore(WrapperStore[Any]):
    """The keys of ``store`` below ``prefix``, read-only, with the prefix removed."""

    def __init__(self, store: Any, prefix: str) -> None:
        super().__init__(store)
        self._prefix = prefix.strip("/")

    def _with_store(self, store: Any) -> PrefixStore:
        return type(self)(store, self._prefix)

    def _full(self, key: str) -> str:
        return f"{self._prefix}/{key}" if key else self._prefix

    def _strip(self, key: str) -> str:
        return key[len(self._prefix) + 1 :]

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await self._store.get(self._full(key), prototype, byte_range)

    async def get_partial_values(
        self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]
    ) -> list[Any]:
        ranges = [(self._full(k), r) for k, r in key_ranges]
        return list(await self._store.get_partial_values(prototype, ranges))

    async def exists(self, key: str) -> bool:
        return bool(await self._store.exists(self._full(key)))

    async def getsize(self, key: str) -> int:
        return int(await self._store.getsize(self._full(key)))

    async def list(self) -> AsyncGenerator[str, None]:
        async for key in self._store.list_prefix(self._prefix + "/"):
            yield self._strip(key)

    async def list_prefix(self, prefix: str) -> AsyncGenerator[str, None]:
        full = self._full(prefix) if prefix else self._prefix + "/"
        async for key in self._store.list_prefix(full):
            yield self._strip(key)

    async def list_dir(self, prefix: str) -> AsyncGenerator[str, None]:
        async for name in self._store.list_dir(self._full(prefix.rstrip("/"))):
            yield name

    async def is_empty(self, prefix: str) -> bool:
        async for _ in self.list_prefix(prefix):
            return False
        return True

    async def _get_many(
        self, requests: Iterable[tuple[str, Any, Any]]
    ) -> AsyncGenerator[tuple[str, Any], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    def __eq__(self, value: object) -> bool:
        return (
            isinstance(value, PrefixStore)
            and self._prefix == value._prefix
            and self._store == value._store
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking store: as zarr's own
