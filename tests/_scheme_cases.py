"""Multi-process cases of tests/test_object_store_schemes.py (module-level so that
spawned ranks can import them)."""

from __future__ import annotations

from typing import Any

import torch


def memory_refused(rank: int, world_size: int, url: str) -> dict[str, Any]:
    """Each rank tries save, async_save and load of ``url`` (memory://); returns the
    errors and what its in-memory store holds afterwards."""
    import zarrckpt
    from zarrckpt.errors import InvalidPathError
    from zarrckpt.storage._object import ObjectStore

    errors = {}
    calls = {
        "save": lambda: zarrckpt.save({"w": torch.ones(4)}, url),
        "async_save": lambda: zarrckpt.async_save({"w": torch.ones(4)}, url).result(),
        "load": lambda: zarrckpt.load({"w": torch.zeros(4)}, url),
    }
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except InvalidPathError as e:
            errors[name] = str(e)
    return {"errors": errors, "keys": ObjectStore(url).object_keys()}
