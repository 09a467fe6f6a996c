"""Checkpoint systems under test, registered by name.

A system has a ``save(workload, path, fsync, options)`` and/or a
``load(workload, path, options)`` function. Saves write ``path`` (a file or a
directory, which must not exist yet). Loads end with the checkpoint's values
in the workload's own tensors (the preallocated "model"), copying them there
when the library returns new tensors, and return None; a load that returns
its data instead returns ``{fqn: array}``. Every load
is verified against crc32c checksums by the runner, outside the timings.

``fsync=True`` means the bytes are durable when ``save`` returns: single-file
systems write then ``os.fsync`` the file (as the raw numpy bound does);
libraries with their own switch use it (DCP ``sync_files``, tensorstore
``file_io_sync``, zarrckpt ``fsync``).

Add a system with :func:`register_system`. A load-only system names the
system whose saved files it reads with ``reads_from``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._measure import fsync_file
from .workloads import Workload, flatten_tensors

__all__ = [
    "System",
    "SYSTEMS",
    "RAW",
    "register_system",
    "copy_into",
    "write_raw",
    "read_raw_into",
]

SaveFn = Callable[[Workload, str, bool, Mapping[str, Any]], None]
LoadFn = Callable[[Workload, str, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class System:
    """A checkpoint system: how it saves and loads a workload."""

    name: str
    label: str
    save: SaveFn | None = None
    load: LoadFn | None = None
    #: load-only systems read the files saved by this system
    reads_from: str | None = None
    #: one line for the report: what exactly is measured
    note: str = ""
    #: modules imported before measuring (imports never land in a timing)
    modules: tuple[str, ...] = ()
    #: workload kinds that measure this system (see ``benchmarks.workloads``)
    kinds: tuple[str, ...] = ("single",)

    @property
    def source(self) -> str:
        """Name of the system whose saved checkpoint this one loads."""
        return self.reads_from or self.name


SYSTEMS: dict[str, System] = {}

#: the physical bound every figure is compared with
RAW = "numpy_raw"


def register_system(system: System) -> System:
    """Add ``system`` to the registry (replacing one of the same name)."""
    SYSTEMS[system.name] = system
    return system


def copy_into(targets: Mapping[str, torch.Tensor], loaded: Mapping[str, Any]) -> None:
    """Copy loaded tensors into the workload's tensors (what ``load_state_dict`` does)."""
    with torch.no_grad():
        for fqn, target in targets.items():
            value = loaded[fqn]
            if not isinstance(value, torch.Tensor):
                value = _numpy_to_torch(value, target.dtype)
            target.copy_(value)


def _numpy_to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view; bfloat16 as ml_dtypes.bfloat16."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _raw_view(t: torch.Tensor) -> np.ndarray:
    """numpy array of the tensor's bytes with a numpy-native dtype of the same width."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


# --------------------------------------------------------------------------- zarrckpt


def _zarrckpt_save(wl: Workload, path: str, fsync: bool, options: Mapping[str, Any]) -> None:
    import zarrckpt

    keys = ("threads", "chunk_bytes", "inner_chunk_bytes")
    opts = {k: v for k, v in options.items() if k in keys}
    zarrckpt.save(wl.state_dict, path, fsync=fsync, **opts)


def _zarrckpt_load(wl: Workload, path: str, options: Mapping[str, Any]) -> None:
    import zarrckpt

    opts = {k: v for k, v in options.items() if k == "threads"}
    zarrckpt.load(wl.state_dict, path, **opts)


register_system(
    System(
        "zarrckpt",
        "zarrckpt",
        _zarrckpt_save,
        _zarrckpt_load,
        note="zarrckpt.save(sd, dir, fsync=...) / zarrckpt.load(sd, dir) in place, defaults",
        modules=("zarrckpt",),
        kinds=("single", "distributed", "async"),
    )
)


def _plugin_save(wl: Workload, path: str, fsync: bool, options: Mapping[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    from zarrckpt import ZarrStorageWriter

    dcp.save(wl.state_dict, storage_writer=ZarrStorageWriter(path, fsync=fsync))


def _plugin_load(wl: Workload, path: str, options: Mapping[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    from zarrckpt import ZarrStorageReader

    dcp.load(wl.state_dict, storage_reader=ZarrStorageReader(path))


register_system(
    System(
        "zarrckpt_dcp",
        "zarrckpt DCP plug-in",
        _plugin_save,
        _plugin_load,
        note="dcp.save(sd, storage_writer=ZarrStorageWriter(dir, fsync=...)) / "
        "dcp.load(sd, storage_reader=ZarrStorageReader(dir)): DCP's planners, zarrckpt's format",
        modules=("zarrckpt", "torch.distributed.checkpoint"),
    )
)

# --------------------------------------------------------------------------- torch.save


def _torch_save(wl: Workload, path: str, fsync: bool, options: Mapping[str, Any]) -> None:
    torch.save(wl.state_dict, path)
    if fsync:
        fsync_file(path)


def _torch_load(wl: Workload, path: str, options: Mapping[str, Any]) -> None:
    loaded = torch.load(path, weights_only=True)
    copy_into(wl.flat, flatten_tensors(loaded))


def _torch_load_mmap(wl: Workload, path: str, options: Mapping[str, Any]) -> None:
    loaded = torch.load(path, weights_only=True, mmap=True)
    copy_into(wl.flat, flatten_tensors(loaded))


register_system(
    System(
        "torch_save",
        "torch.save / torch.load",
        _torch_save,
        _torch_load,
        note="torch.save(sd, file) [+ os.fsync]; torch.load(file) then copy_ into the model",
    )
)
register_system(
    System(
        "torch_mmap",
        "torch.load(mmap=True)",
        None,
        _torch_load_mmap,
        reads_from="torch_save",
        note="torch.load(file, mmap=True) then copy_ into the model (reads torch.save's file)",
    )
)

# --------------------------------------------------------------------------- DCP


def _dcp_save(wl: Workload, path: str, fsync: bool, options: Mapping[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(wl.state_dict, storage_writer=dcp.FileSystemWriter(path, sync_files=fsync))


def _dcp_load(wl: Workload, path: str, options: Mapping[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load(wl.state_dict, storage_reader=dcp.FileSystemReader(path))


register_system(
    System(
        "dcp",
        "DCP FileSystemWriter",
        _dcp_save,
        _dcp_load,
        note="torch.distributed.checkpoint save/load, FileSystemWriter(sync_files=fsync) "
        "defaults, no process group (distributed workloads: the gloo group)",
        modules=("torch.distributed.checkpoint",),
        kinds=("single", "distributed", "async"),
    )
)

# --------------------------------------------------------------------------- safetensors


def _safetensors_save(wl: Workload, path: str, fsync: bool, options: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(wl.flat, path)
    if fsync:
        fsync_file(path)


def _safetensors_load(wl: Workload, path: str, options: Mapping[str, Any]) -> None:
    from safetensors.torch import load_file

    copy_into(wl.flat, load_file(path))


register_system(
    System(
        "safetensors",
        "safetensors",
        _safetensors_save,
        _safetensors_load,
        note="save_file(flat tensors) [+ os.fsync]; load_file then copy_ (tensors only)",
        modules=("safetensors.torch",),
    )
)

# --------------------------------------------------------------------------- tensorstore

_TS_CHUNK_BYTES = 64 << 20


def _ts_spec(path: str, array: np.ndarray | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if array is not None:
        shape = list(array.shape)
        chunk = list(shape)
        if shape:
            row = max(1, int(np.prod(shape[1:])) * array.itemsize)
            chunk[0] = max(1, min(shape[0], _TS_CHUNK_BYTES // row))
        chunk = [max(1, c) for c in chunk]
        spec["metadata"] = {
            "shape": shape,
            "data_type": str(array.dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        }
    return spec


def _tensorstore_save(wl: Workload, path: str, fsync: bool, options: Mapping[str, Any]) -> None:
    import tensorstore as ts

    context = ts.Context({"file_io_sync": fsync})
    arrays = {fqn: _torch_to_numpy(t) for fqn, t in wl.flat.items()}
    opens = [
        ts.open(_ts_spec(os.path.join(path, fqn), a), create=True, context=context)
        for fqn, a in arrays.items()
    ]
    writes = [f.result().write(a) for f, a in zip(opens, arrays.values(), strict=True)]
    for w in writes:
        w.result()


def _tensorstore_load(wl: Workload, path: str, options: Mapping[str, Any]) -> None:
    import tensorstore as ts

    context = ts.Context()
    opens = [ts.open(_ts_spec(os.path.join(path, fqn)), context=context) for fqn in wl.flat]
    reads = [f.result().read() for f in opens]
    copy_into(wl.flat, {fqn: r.result() for fqn, r in zip(wl.flat, reads, strict=True)})


register_system(
    System(
        "tensorstore",
        "tensorstore zarr3",
        _tensorstore_save,
        _tensorstore_load,
        note="one uncompressed zarr3 array per tensor (64 MiB row-slab chunks, file_io_sync="
        "fsync), concurrent writes/reads; read() then copy_ (tensors only)",
        modules=("tensorstore", "ml_dtypes"),
    )
)

# --------------------------------------------------------------------------- raw bound


def write_raw(tensors: Iterable[torch.Tensor], path: str, fsync: bool) -> None:
    """The raw bound's save: the tensors' bytes one after the other in one file
    (``ndarray.tofile``), ``os.fsync`` if asked."""
    with open(path, "wb") as f:
        for t in tensors:
            _raw_view(t).tofile(f)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_raw_into(tensors: Iterable[torch.Tensor], path: str) -> None:
    """The raw bound's load: one sequential pass of ``readinto`` straight into ``tensors``."""
    with open(path, "rb", buffering=0) as f:
        for t in tensors:
            view = memoryview(_raw_view(t).reshape(-1).view(np.uint8).data)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise EOFError(f"{path} is truncated")
                got += n


def _raw_save(wl: Workload, path: str, fsync: bool, options: Mapping[str, Any]) -> None:
    write_raw(wl.flat.values(), path, fsync)


def _raw_load(wl: Workload, path: str, options: Mapping[str, Any]) -> None:
    read_raw_into(wl.flat.values(), path)


register_system(
    System(
        RAW,
        "numpy raw bound",
        _raw_save,
        _raw_load,
        note="the same bytes as one file: ndarray.tofile per tensor [+ os.fsync]; "
        "read back sequentially, single-threaded, with readinto straight into the model's "
        "tensors (np.fromfile without its allocation); distributed: one such file per rank",
        kinds=("single", "distributed"),
    )
)

# --------------------------------------------------------------------------- async baselines
# Measured by the async workload only (benchmarks.async_save): what a training loop
# pays to snapshot its state without any checkpoint library.

register_system(
    System(
        "host_clone",
        "plain host copy (clone)",
        note="{fqn: t.clone()} of every tensor: a plain host copy of the state, fresh memory",
        kinds=("async",),
    )
)
register_system(
    System(
        "host_copy",
        "host copy into preallocated buffers",
        note="buffer.copy_(t) of every tensor into buffers allocated once beforehand",
        kinds=("async",),
    )
)
