"""Load planning: match a target state dict against a checkpoint.

The walk over the target records what to read (one request per local piece,
straight into the target's memory where possible) and what to put back
(values, tensors replacing meta-device targets), without modifying anything;
the caller runs the reads and applies the changes only when the whole plan is
valid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._dtypes import numpy_as_tensor, tensor_as_numpy
from ._flatten import child_nodes, decode_plain, is_stateful
from ._metadata import ArrayEntry
from ._reader import CheckpointFiles, ReadRequest
from ._sharding import describe_leaf, is_tensor_leaf

__all__ = ["LoadPlan"]


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _init_optimizer_state(optim: torch.optim.Optimizer, node: dict[str, Any] | None) -> None:
    """Give a fresh optimizer its state entries so the stored ones can be loaded into them
    (what DCP's ``get_state_dict`` does: one step with zero gradients and lr 0)."""
    children = child_nodes(node) if node is not None else None
    stored_state = child_nodes(children["state"]) if children and "state" in children else None
    if not stored_state:
        return
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optim)


class LoadPlan:
    """What a load will do: reads to run, then values to put back."""

    def __init__(self, files: CheckpointFiles, *, allow_pickle: bool) -> None:
        self.files = files
        self.allow_pickle = allow_pickle
        self.requests: list[ReadRequest] = []
        #: (target tensor, temporary tensor) pairs to copy after the reads
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: (container, key, value) replacements applied after the reads
        self.assignments: list[tuple[Any, Any, Any]] = []
        #: callbacks run last (load_state_dict of Stateful objects)
        self.after: list[Callable[[], Any]] = []
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.bytes_needed = 0

    # ------------------------------------------------------------------ reads
    def _read_new(self, entry: ArrayEntry) -> torch.Tensor:
        dest = np.empty(entry.shape, dtype=entry.dtype.numpy_dtype)
        self._request(entry, dest, (0,) * dest.ndim)
        return numpy_as_tensor(dest, entry.dtype.torch_dtype)

    def _request(self, entry: ArrayEntry, dest: np.ndarray, origin: tuple[int, ...]) -> None:
        self.requests.append(ReadRequest(entry, dest, origin))
        self.bytes_needed += dest.nbytes

    def _resolve(self, kind: str, fqn: str) -> Any:
        if kind == "pickle":
            return self.files.read_pickled(fqn, allow_pickle=self.allow_pickle)
        if kind == "bytes":
            return self.files.read_bytes(fqn)
        return self._read_new(self.files.arrays[fqn])

    def _fill(self, entry: ArrayEntry, target: torch.Tensor, origin: tuple[int, ...]) -> None:
        """Plan filling the local tensor (or view) ``target`` that holds ``origin``..."""
        direct = (
            target.device.type == "cpu"
            and target.dtype == entry.dtype.torch_dtype
            and not target.is_conj()
            and not target.is_neg()
        )
        if direct:
            self._request(entry, tensor_as_numpy(target), origin)
            return
        dest = np.empty(tuple(target.shape), dtype=entry.dtype.numpy_dtype)
        self._request(entry, dest, origin)
        self.copies.append((target, numpy_as_tensor(dest, entry.dtype.torch_dtype)))

    # ------------------------------------------------------------------ tensors
    def tensor(self, fqn: str, target: Any, node: dict[str, Any] | None) -> Any:
        """Plan filling ``target``; return the value to keep in the state dict."""
        if node is None:
            self.missing.append(fqn)
            return target
        if "tensor" not in node:
            self.mismatched.append(
                f"{fqn!r}: the target holds a tensor but the checkpoint stores a "
                f"{next(iter(node))} here"
            )
            return target
        entry = self.files.arrays[node["tensor"]]
        view = describe_leaf(target, key=fqn, path=self.files.path)
        if view.global_shape != entry.shape:
            self.mismatched.append(
                f"{fqn!r}: checkpoint has shape {list(entry.shape)} ({entry.dtype.zarr_name}), "
                f"target has shape {list(view.global_shape)} ({_dtype_name(view.dtype)})"
            )
            return target
        if view.kind == "tensor" and target.device.type == "meta":
            # filled (and cast, after the reads) like any target; a ``.to()`` here
            # would copy the buffer before the reads have filled it
            new = torch.empty(tuple(target.shape), dtype=target.dtype)
            self._fill(entry, new, (0,) * new.dim())
            return new
        if view.kind == "dtensor" and target._local_tensor.device.type == "meta":
            return self._materialize_dtensor(entry, target)
        for block in view.blocks:
            self._fill(entry, block.data(), tuple(a for a, _ in block.region))
        return target

    def _materialize_dtensor(self, entry: ArrayEntry, target: Any) -> Any:
        from torch.distributed.tensor import DTensor

        local = torch.empty(tuple(target._local_tensor.shape), dtype=target.dtype)
        new = DTensor.from_local(
            local,
            target.device_mesh,
            target.placements,
            run_check=False,
            shape=target.shape,
            stride=target.stride(),
        )
        view = describe_leaf(new, key=entry.fqn, path=self.files.path)
        for block in view.blocks:
            self._fill(entry, block.data(), tuple(a for a, _ in block.region))
        if target.requires_grad:
            new.requires_grad_(True)
        return new

    # ------------------------------------------------------------------ walk
    def walk(self, target: Any, node: dict[str, Any] | None, fqn: str) -> Any:
        """Plan loading into ``target``; return the value to keep in its place."""
        if is_tensor_leaf(target):
            return self.tensor(fqn, target, node)
        if is_stateful(target):
            if isinstance(target, torch.optim.Optimizer) and not target.state:
                _init_optimizer_state(target, node)
            inner = target.state_dict()
            sub = node.get("stateful", node) if node is not None else None
            inner = self.walk(inner, sub, fqn)
            self.after.append(lambda: target.load_state_dict(inner))
            return target
        children = child_nodes(node) if node is not None else None
        if isinstance(target, dict):
            for key, value in target.items():
                child = children.get(key) if children is not None else None
                new = self.walk(value, child, _join(fqn, key))
                if new is not value:
                    self.assignments.append((target, key, new))
            return target
        if isinstance(target, (list, tuple)):
            values = [
                self.walk(v, children.get(i) if children is not None else None, _join(fqn, i))
                for i, v in enumerate(target)
            ]
            if isinstance(target, list):
                for i, (old, new) in enumerate(zip(target, values, strict=True)):
                    if new is not old:
                        self.assignments.append((target, i, new))
                return target
            if all(n is o for n, o in zip(values, target, strict=True)):
                return target
            return type(target)(values) if type(target) is tuple else type(target)(*values)
        # plain value: replaced by the stored value (which may itself hold tensors)
        if node is None:
            self.missing.append(fqn)
            return target
        return decode_plain(node, self._resolve)

    def apply(self) -> None:
        """After the reads: copy temporaries, put values back, call load_state_dict."""
        with torch.no_grad():
            for target, loaded in self.copies:
                target.copy_(loaded)
        for container, key, value in self.assignments:
            container[key] = value
        for callback in self.after:
            callback()
