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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from zarrckpt import ZarrStorageReader, ZarrStorageWriter

    dcp_calls = {
        "dcp.save": lambda: dcp.save({"w": torch.ones(4)}, storage_writer=ZarrStorageWriter(url)),
        "dcp.load": lambda: dcp.load({"w": torch.ones(4)}, storage_reader=ZarrStorageReader(url)),
    }
    for name, call in dcp_calls.items():
        try:
            call()
            errors[name] = None
        except InvalidPathError as e:  # raised by read_metadata, before DCP's collectives
            errors[name] = str(e)
        except CheckpointException as e:  # DCP gathers every rank's failure
            failures = [f[0] for f in e.failures.values()]
            ok = all(isinstance(f, InvalidPathError) for f in failures)
            errors[name] = str(failures[0]) if ok and failures else repr(e)
    return {"errors": errors, "keys": ObjectStore(url).object_keys()}
