"""Load planning: match a target state dict against a checkpoint.

The walk over the target records what to read (one request per local piece,
straight into the target's memory where possible) and what to put back
(values, tensors replacing meta-device targets, optimizer state), without
modifying anything; the caller runs the reads and applies the changes only
when the whole plan is valid.

What the target's structure decides: the keys of its dicts (always, as in
DCP, so that per-rank keys stay per rank) and the positions of its lists and
tuples that hold tensors or Stateful objects. Lists and tuples of plain values
take the stored structure (as DCP loads them whole), and the per-parameter
entries of an optimizer state dict follow the checkpoint, as
``Optimizer.load_state_dict`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedValueError
from ..format._dtypes import numpy_as_tensor, tensor_as_numpy
from ..format._flatten import child_nodes, decode_plain, is_stateful
from ..format._metadata import ArrayEntry
from ._reader import CheckpointFiles, ReadRequest
from ._sharding import describe_leaf, is_tensor_leaf

__all__ = ["LoadPlan"]


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_meta(value: Any) -> bool:
    """A tensor (or a DTensor's local tensor) on the meta device: it holds no values."""
    if not isinstance(value, torch.Tensor):
        return False
    local = getattr(value, "_local_tensor", None)
    return (local if isinstance(local, torch.Tensor) else value).device.type == "meta"


def _meta_fqns(obj: Any, fqn: str) -> list[str]:
    """FQNs of the meta-device tensors in a nested state dict."""
    if _is_meta(obj):
        return [fqn]
    if isinstance(obj, dict):
        return [m for k, v in obj.items() for m in _meta_fqns(v, _join(fqn, k))]
    if isinstance(obj, (list, tuple)):
        return [m for i, v in enumerate(obj) for m in _meta_fqns(v, _join(fqn, i))]
    return []


def _holds_state(obj: Any) -> bool:
    """True for tensors and Stateful objects and for containers holding any: their
    structure is the target's. Lists and tuples of plain values take the stored structure."""
    if is_tensor_leaf(obj) or is_stateful(obj):
        return True
    if isinstance(obj, dict):
        return any(_holds_state(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_state(v) for v in obj)
    return False


def _is_optimizer_state(obj: Any) -> bool:
    """The form of ``Optimizer.state_dict()`` (also DCP's FQN-keyed form)."""
    return (
        isinstance(obj, dict)
        and obj.keys() == {"state", "param_groups"}
        and isinstance(obj["state"], dict)
        and isinstance(obj["param_groups"], list)
        and all(isinstance(g, dict) and "params" in g for g in obj["param_groups"])
    )


def _leaf_fqns(node: dict[str, Any], fqn: str) -> list[str]:
    """FQNs of the leaves (tensors and plain values) of a stored tree node."""
    children = child_nodes(node)
    if children is None:
        return [fqn]
    return [leaf for key, child in children.items() for leaf in _leaf_fqns(child, _join(fqn, key))]


def _group_sizes(node: dict[str, Any] | None) -> list[int] | None:
    """Number of parameters in each stored param group (None when not a list of groups)."""
    groups = child_nodes(node) if node is not None else None
    if groups is None:
        return None
    sizes = []
    for group in groups.values():
        params = (child_nodes(group) or {}).get("params")
        entries = child_nodes(params) if params is not None else None
        if entries is None:
            return None
        sizes.append(len(entries))
    return sizes


def _like(target: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` as a parameter if ``target`` is one (same ``requires_grad``)."""
    if isinstance(target, torch.nn.Parameter):
        return torch.nn.Parameter(new, requires_grad=target.requires_grad)
    if target.requires_grad:
        new.requires_grad_(True)
    return new


class LoadPlan:
    """What a load will do: reads to run, then values to put back.

    Nothing is modified while planning; :meth:`apply` makes every change.
    """

    def __init__(self, files: CheckpointFiles, *, allow_pickle: bool) -> None:
        self.files = files
        self.allow_pickle = allow_pickle
        self.requests: list[ReadRequest] = []
        #: (target tensor, temporary tensor) pairs to copy after the reads
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: (container, key, value) replacements applied after the reads
        self.assignments: list[tuple[Any, Any, Any]] = []
        #: (container, stored value of the same type): contents replaced in place
        self.refills: list[tuple[Any, Any]] = []
        #: (dict, key) entries removed (optimizer state the checkpoint does not have)
        self.deletions: list[tuple[dict[Any, Any], Any]] = []
        #: callbacks run last (load_state_dict of Stateful objects)
        self.after: list[Callable[[], Any]] = []
        self.missing: list[str] = []
        #: missing keys whose target is a meta-device tensor (cannot be skipped)
        self.meta_missing: list[str] = []
        self.mismatched: list[str] = []
        #: stored leaves the target asked for
        self.used: set[str] = set()
        #: id of a Stateful optimizer's ``state`` dict -> its parameters by index
        self.optimizer_params: dict[int, dict[Any, torch.Tensor]] = {}
        self.bytes_needed = 0

    def unexpected(self) -> list[str]:
        """Stored keys the target did not ask for."""
        return [fqn for fqn in _leaf_fqns(self.files.tree, "") if fqn not in self.used]

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
            if _is_meta(target):
                self.meta_missing.append(fqn)
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
        self.used.add(fqn)
        if view.kind == "tensor" and target.device.type == "meta":
            # filled (and cast, after the reads) like any target; a ``.to()`` here
            # would copy the buffer before the reads have filled it
            new = torch.empty(tuple(target.shape), dtype=target.dtype)
            self._fill(entry, new, (0,) * new.dim())
            return _like(target, new)
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
        return _like(target, new)

    # ------------------------------------------------------------------ walk
    def walk(self, target: Any, node: dict[str, Any] | None, fqn: str, *, top: bool = False) -> Any:
        """Plan loading into ``target``; return the value to keep in its place.

        ``top`` marks the root of a state dict (the target's, or a Stateful
        object's): its keys are always the target's.
        """
        if is_tensor_leaf(target):
            return self.tensor(fqn, target, node)
        if is_stateful(target):
            self._stateful(target, node, fqn)
            return target
        if not isinstance(target, (dict, list, tuple)) or not (
            top or isinstance(target, dict) or _holds_state(target)
        ):
            # dicts are matched key by key (the target chooses, as in DCP: per-rank
            # keys stay per rank); lists and tuples of plain values are replaced whole
            return self._plain(target, node, fqn)
        children = child_nodes(node) if node is not None else None
        if isinstance(target, dict):
            optimizer = _is_optimizer_state(target) and children is not None
            if optimizer:
                self._check_groups(target, children, fqn)  # type: ignore[arg-type]
            for key, value in target.items():
                child = children.get(key) if children is not None else None
                if optimizer and key == "state" and child is not None:
                    stored = child_nodes(child)
                    if stored is not None and isinstance(value, dict):
                        self._optimizer_state(value, stored, _join(fqn, key))
                        continue
                new = self.walk(value, child, _join(fqn, key))
                if new is not value:
                    self.assignments.append((target, key, new))
            return target
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

    def _plain(self, target: Any, node: dict[str, Any] | None, fqn: str) -> Any:
        """A plain value or a container of plain values: the stored value replaces it
        whole (lists, dicts and tuples take the stored length and keys)."""
        if node is None:
            self.missing.append(fqn)
            return target
        self.used.update(_leaf_fqns(node, fqn))
        value = decode_plain(node, self._resolve)
        if type(target) is type(value) and type(target) in (list, dict):
            self.refills.append((target, value))  # same container object, stored contents
            return target
        return value

    def _stateful(self, target: Any, node: dict[str, Any] | None, fqn: str) -> None:
        """Plan ``target.load_state_dict`` with its own ``state_dict()`` loaded."""
        inner = target.state_dict()
        sub = node.get("stateful", node) if node is not None else None
        if isinstance(target, torch.optim.Optimizer) and _is_optimizer_state(inner):
            # state_dict() numbers the parameters in param-group order
            params = [p for group in target.param_groups for p in group["params"]]
            self.optimizer_params[id(inner["state"])] = dict(enumerate(params))
        meta = set(_meta_fqns(inner, ""))
        loaded = self.walk(inner, sub, fqn, top=True)
        if meta and isinstance(target, torch.nn.Module) and isinstance(loaded, dict):
            # copying into a meta parameter does nothing: the materialized tensors
            # are assigned (parameters stay parameters, FSDP2 re-registers them)
            def load_module() -> None:
                target.load_state_dict(
                    {k: v for k, v in loaded.items() if k in meta}, strict=False, assign=True
                )
                target.load_state_dict(
                    {k: v for k, v in loaded.items() if k not in meta}, strict=False
                )

            self.after.append(load_module)
        else:
            self.after.append(lambda: target.load_state_dict(loaded))
        if meta:
            self.after.append(lambda: self._check_materialized(target, fqn))

    def _check_materialized(self, target: Any, fqn: str) -> None:
        left = _meta_fqns(target.state_dict(), fqn)
        if left:
            raise UnsupportedValueError(
                f"loading checkpoint {self.files.path!r} into {type(target).__name__} at "
                f"{fqn or '<root>'!r}: its load_state_dict left {len(left)} tensor(s) on the "
                f"meta device ({left[:5]}{' ...' if len(left) > 5 else ''}); copying into a "
                "meta tensor does nothing. Materialize it first (e.g. Module.to_empty) or "
                "load a dict (its state_dict()) and assign the loaded tensors yourself"
            )

    def _check_groups(self, target: dict[str, Any], children: dict[Any, Any], fqn: str) -> None:
        """Optimizer state: the stored param groups must fit the target's (as torch checks)."""
        stored = _group_sizes(children.get("param_groups"))
        own = [len(g["params"]) for g in target["param_groups"]]
        if stored is not None and stored != own:
            self.mismatched.append(
                f"{_join(fqn, 'param_groups')!r}: the checkpoint's optimizer has param "
                f"groups of {stored} parameters, the target's has {own}"
            )

    def _optimizer_state(self, target: dict[Any, Any], stored: dict[Any, Any], fqn: str) -> None:
        """Per-parameter optimizer state follows the checkpoint, as in
        ``Optimizer.load_state_dict``: a parameter without stored state ends up
        without state, stored state the target lacks is created."""
        for key, value in target.items():
            if key in stored:
                new = self.walk(value, stored[key], _join(fqn, key))
                if new is not value:
                    self.assignments.append((target, key, new))
            else:
                self.deletions.append((target, key))
        params = self.optimizer_params.get(id(target), {})
        for key, child in stored.items():
            if key not in target:
                new = self._new_param_state(child, params.get(key), _join(fqn, key))
                self.assignments.append((target, key, new))

    def _new_param_state(self, node: dict[str, Any], param: Any, fqn: str) -> Any:
        """Stored state of a parameter the target holds no state for. State tensors
        shaped like the parameter are created like it (a DTensor parameter gets
        DTensor state of its placements, each rank reading its shard) in the dtype
        ``Optimizer.load_state_dict`` would cast them to; the rest is read whole."""
        entries = child_nodes(node) if "dict" in node else None
        if not isinstance(param, torch.Tensor) or entries is None:
            self.used.update(_leaf_fqns(node, fqn))
            return decode_plain(node, self._resolve)
        state: dict[Any, Any] = {}
        for name, child in entries.items():
            entry = self.files.arrays.get(child.get("tensor", ""))
            if name != "step" and entry is not None and entry.shape == tuple(param.shape):
                dtype = param.dtype if param.is_floating_point() else entry.dtype.torch_dtype
                with torch.no_grad():
                    like = torch.empty_like(param.detach(), dtype=dtype)
                state[name] = self.tensor(_join(fqn, name), like, child)
            else:
                self.used.update(_leaf_fqns(child, _join(fqn, name)))
                state[name] = decode_plain(child, self._resolve)
        return state

    def apply(self) -> None:
        """After the reads: copy temporaries, put values back, call load_state_dict."""
        with torch.no_grad():
            for target, loaded in self.copies:
                target.copy_(loaded)
        for container, key, value in self.assignments:
            container[key] = value
        for container, value in self.refills:
            if isinstance(container, dict):
                container.clear()
                container.update(value)
            else:
                container[:] = value
        for mapping, key in self.deletions:
            del mapping[key]
        for callback in self.after:
            callback()
