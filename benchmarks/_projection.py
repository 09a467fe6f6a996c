"""Planning-only projection of workload (g) "files at scale" (no data, no processes).

Given the tensor shapes of a model + Adam state sharded FSDP2-style (``Shard(0)``
with ``torch.chunk`` rows: ``ceil(d0 / world)`` rows per rank, trailing ranks
possibly empty), count the files and directories a checkpoint has and the bytes
of its metadata, for

* zarrckpt format 1/2: one chunk file per piece, nested chunk keys ``c/i/j``;
* zarrckpt format 3, ``"shard"`` layout: one shard (or plain) file per array;
* zarrckpt format 3, ``"pieces"`` layout (object stores): one file per piece;
* DCP: one data file per rank (``thread_count=1``) plus ``.metadata``.

Counts come from zarrckpt's own layout functions (``regular_chunk_shape``,
``choose_layout``, ``plan_storage``, ``ArrayLayout.crc_table_size``) applied
once per distinct tensor shape, never per piece of every tensor: running
:func:`~zarrckpt.parallel._planning.plan_arrays` on 24 million pieces is too
slow. :func:`planned_counts` runs the real planner and is what the test checks
this shortcut against. Manifest bytes are those of a real ``root_document``.
"""

from __future__ import annotations

import base64
import json
import math
import pickle
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from zarrckpt.format._dtypes import info_for_torch
from zarrckpt.format._flatten import flatten_state_dict
from zarrckpt.format._json import dumps_json
from zarrckpt.format._layout import ArrayLayout, choose_layout
from zarrckpt.format._metadata import ArrayEntry, array_path, group_paths, root_document
from zarrckpt.format._shard import plan_storage
from zarrckpt.parallel._planning import ArrayPieces, plan_arrays, regular_chunk_shape

__all__ = [
    "LAYOUTS",
    "Leaf",
    "ModelShape",
    "LLAMA2_70B",
    "model_state",
    "tensor_specs",
    "projected_counts",
    "planned_counts",
    "manifest",
    "dcp_metadata",
    "project",
]

#: the layouts compared, in table order
LAYOUTS = ("zarrckpt v1/v2", "zarrckpt v3 shard", "zarrckpt v3 pieces", "dcp")
#: files and directories of the checkpoint root: root dir, zarr.json, ~commit/zarr.json
_ROOT_FILES, _ROOT_DIRS = 2, 2


@dataclass(frozen=True)
class Leaf:
    """A tensor placeholder (shape only) in a projected state dict."""

    shape: tuple[int, ...]
    itemsize: int = 4
    sharded: bool = True


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: GQA attention, SwiGLU MLP, two RMSNorms per layer."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_heads: int
    head_dim: int

    def parameters(self) -> dict[str, tuple[int, ...]]:
        """Parameter FQN -> shape, in ``model.named_parameters()`` order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "self_attn.q_proj.weight"] = (h, h)
            out[p + "self_attn.k_proj.weight"] = (kv, h)
            out[p + "self_attn.v_proj.weight"] = (kv, h)
            out[p + "self_attn.o_proj.weight"] = (h, h)
            out[p + "mlp.gate_proj.weight"] = (self.intermediate, h)
            out[p + "mlp.up_proj.weight"] = (self.intermediate, h)
            out[p + "mlp.down_proj.weight"] = (h, self.intermediate)
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out


#: Llama-2-70B-class (fp32 parameters)
LLAMA2_70B = ModelShape(
    layers=80, hidden=8192, intermediate=28672, vocab=32000, kv_heads=8, head_dim=128
)


def model_state(params: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as ``get_state_dict`` returns it for AdamW after
    one step, with :class:`Leaf` placeholders for tensors (``step`` is a replicated 0-d
    tensor per parameter)."""
    state = {
        fqn: {
            "step": Leaf((), 4, sharded=False),
            "exp_avg": Leaf(shape),
            "exp_avg_sq": Leaf(shape),
        }
        for fqn, shape in params.items()
    }
    group = {
        "lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01,
        "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
        "differentiable": False, "fused": None, "decoupled_weight_decay": True,
        "params": list(params),
    }  # fmt: skip
    return {
        "model": {fqn: Leaf(shape) for fqn, shape in params.items()},
        "optim": {"state": state, "param_groups": [group]},
    }


def tensor_specs(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Leaf]]:
    """zarrckpt's tree and ``{fqn: Leaf}`` for a projected state dict (the real flattening)."""
    flat = flatten_state_dict(
        state, allow_pickle=False, checkpoint="projection",
        is_tensor_leaf=lambda x: isinstance(x, Leaf),
    )  # fmt: skip
    return flat.tree, dict(flat.tensors)


def _row_regions(shape: tuple[int, ...], world: int) -> list[tuple[tuple[int, int], ...]]:
    """``torch.chunk`` rows of each rank holding data (empty trailing ranks omitted)."""
    rows = -(-shape[0] // world)
    rest = tuple((0, s) for s in shape[1:])
    return [((a, min(a + rows, shape[0])), *rest) for a in range(0, shape[0], rows)]


@dataclass(frozen=True)
class _Counts:
    """Per-array counts of one tensor shape at one world size."""

    v1: ArrayLayout  # pieces layout with "/" keys (formats 1 and 2)
    shard: ArrayLayout  # format 3 on shared storage
    shard_files: int
    pieces: ArrayLayout  # format 3 on object stores
    dcp_entries: int


def _nested_dirs(layout: ArrayLayout) -> int:
    """Directories of nested ``c/i/j`` chunk keys: ``c/`` and one per key prefix."""
    if not layout.shape or any(s == 0 for s in layout.shape):
        return 0
    grid = layout.grid_shape
    return 1 + sum(math.prod(grid[:j]) for j in range(1, len(grid)))


@cache
def _counts(shape: tuple[int, ...], itemsize: int, sharded: bool, world: int) -> _Counts:
    """The planner's rules for one tensor, without per-piece work over all tensors."""
    regions = _row_regions(shape, world) if sharded and shape else []
    if len(regions) <= 1:  # held whole by the ranks that have it: the replicated rule
        pieces = choose_layout(shape, itemsize)
        writers = None
        dcp = 1
    else:
        chunk = regular_chunk_shape(shape, regions)
        assert chunk is not None
        pieces = choose_layout(shape, itemsize, chunk_shape=chunk)
        writers = {(i,) + (0,) * (len(shape) - 1): i for i in range(len(regions))}
        dcp = len(regions) + (1 if len(regions) < world else 0)  # empties share one entry
    stored = plan_storage(pieces, writers, shared_files=True)
    by_piece = plan_storage(pieces, writers, shared_files=False)
    empty = any(s == 0 for s in shape)
    files = 0 if empty else (1 if stored.mode in ("shard", "plain") else 0)
    return _Counts(pieces, stored.layout, files, by_piece.layout, dcp)


def _n_chunks(layout: ArrayLayout) -> int:
    return math.prod(layout.grid_shape) if all(s > 0 for s in layout.shape) else 0


def _add_groups(out: dict[str, dict[str, int]], specs: dict[str, Leaf]) -> None:
    layouts = {fqn: _counts(s.shape, s.itemsize, s.sharded, 1).v1 for fqn, s in specs.items()}
    groups = len(group_paths([_entry(fqn, layout) for fqn, layout in layouts.items()]))
    for name, row in out.items():
        if name != "dcp":
            row["files"] += groups
            row["dirs"] += groups


def projected_counts(specs: dict[str, Leaf], world: int) -> dict[str, dict[str, int]]:
    """Files and directories (checkpoint root included) of each layout at ``world`` ranks."""
    out = {k: {"files": _ROOT_FILES, "dirs": _ROOT_DIRS} for k in LAYOUTS}
    out["dcp"] = {"files": world + 1, "dirs": 1, "entries": 0}
    for leaf in specs.values():
        c = _counts(leaf.shape, leaf.itemsize, leaf.sharded, world)
        out["zarrckpt v1/v2"]["files"] += 1 + _n_chunks(c.v1)
        out["zarrckpt v1/v2"]["dirs"] += 1 + _nested_dirs(c.v1)
        out["zarrckpt v3 shard"]["files"] += 1 + c.shard_files
        out["zarrckpt v3 shard"]["dirs"] += 1
        out["zarrckpt v3 pieces"]["files"] += 1 + _n_chunks(c.pieces)
        out["zarrckpt v3 pieces"]["dirs"] += 1
        out["dcp"]["entries"] += c.dcp_entries
    _add_groups(out, specs)
    return out


def planned_counts(specs: dict[str, Leaf], world: int) -> dict[str, dict[str, int]]:
    """The same counts from the real planner (:func:`plan_arrays` on every piece, then
    :func:`plan_storage`, files listed from every piece's target key): slow, for checks."""
    arrays = []
    for fqn, leaf in specs.items():
        if leaf.sharded and leaf.shape:
            regions = _row_regions(leaf.shape, world)
            pieces = tuple((regions[r],) if r < len(regions) else () for r in range(world))
            arrays.append(ArrayPieces(fqn, leaf.shape, leaf.itemsize, pieces))
        else:
            full = (tuple((0, s) for s in leaf.shape),)
            arrays.append(ArrayPieces(fqn, leaf.shape, leaf.itemsize, (full,) * world, True))
    out = {k: {"files": _ROOT_FILES, "dirs": _ROOT_DIRS} for k in LAYOUTS if k != "dcp"}
    for plan in plan_arrays(arrays, world):
        writers = {index: rank for index, (rank, _) in plan.writers.items()}
        keys = {"zarrckpt v1/v2": {plan.layout.chunk_key(i) for i in plan.writers}}
        for name, shared in (("zarrckpt v3 shard", True), ("zarrckpt v3 pieces", False)):
            stored = plan_storage(plan.layout, writers, shared_files=shared)
            keys[name] = {stored.target(i).key for i in plan.writers}
        for name, chunk_keys in keys.items():
            dirs = {k.rsplit("/", 1)[0] for k in chunk_keys if "/" in k}
            dirs |= {d.rsplit("/", 1)[0] for d in dirs if "/" in d}  # c/ above c/i
            out[name]["files"] += 1 + len(chunk_keys)
            out[name]["dirs"] += 1 + len(dirs)
    _add_groups(out, specs)
    return out


def _entry(fqn: str, layout: ArrayLayout, crcs: bytes | None = None) -> ArrayEntry:
    return ArrayEntry(fqn, array_path(fqn), info_for_torch(torch.float32), layout, crcs=crcs)


def manifest(
    tree: dict[str, Any], specs: dict[str, Leaf], world: int, layout: str
) -> tuple[int, float]:
    """Bytes of the root ``zarr.json`` of ``layout`` (as the writer serializes it) and the
    seconds to parse it (fastest of 3: ``json.loads`` + base64 decode of every crc32c
    table; format 3)."""
    entries = []
    for fqn, leaf in specs.items():
        c = _counts(leaf.shape, leaf.itemsize, leaf.sharded, world)
        if layout == "zarrckpt v1/v2":
            entries.append(_entry(fqn, c.v1))
        else:
            lay = c.shard if layout == "zarrckpt v3 shard" else c.pieces
            entries.append(_entry(fqn, lay, bytes(4 * lay.crc_table_size)))
    sharding = {
        fqn: {"mesh_shape": [world], "mesh_dim_names": [], "placements": ["Shard(dim=0)"]}
        for fqn, leaf in specs.items() if leaf.sharded and leaf.shape
    }  # fmt: skip
    extra = {"mesh": {"shape": [world], "dim_names": []}, "sharding": sharding}
    doc = root_document(
        tree=tree, entries=entries, checkpoint_id="0" * 32, world_size=world, extra=extra
    )
    if layout == "zarrckpt v1/v2":
        del doc["consolidated_metadata"]
    text = dumps_json(doc).encode("utf-8")
    del doc, entries
    best = float("inf")
    for _ in range(3):  # the fastest of 3 parses (the machine is shared)
        t0 = time.perf_counter()
        parsed = json.loads(text)
        for record in parsed["attributes"]["zarrckpt"]["arrays"].values():
            if "crc32c" in record:
                base64.b64decode(record["crc32c"])
        best = min(best, time.perf_counter() - t0)
        del parsed
    return len(text), best


def dcp_metadata(specs: dict[str, Leaf], world: int) -> tuple[int, int]:
    """(pickled bytes, chunk entries) of a real DCP ``Metadata`` with every entry."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    sd_meta: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    used = [0] * world
    for fqn, leaf in specs.items():
        regions = _row_regions(leaf.shape, world) if leaf.sharded and leaf.shape else []
        if len(regions) > 1 and len(regions) < world:
            regions.append(((leaf.shape[0], leaf.shape[0]), *regions[0][1:]))  # empty ranks
        if len(regions) <= 1:
            regions = [tuple((0, s) for s in leaf.shape)]
        chunks = []
        for i, region in enumerate(regions):
            offsets = torch.Size([a for a, _ in region])
            sizes = torch.Size([b - a for a, b in region])
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
            rank = i % world
            length = math.prod(sizes) * leaf.itemsize + 1500  # + torch.save framing
            storage[MetadataIndex(fqn, offsets, i)] = _StorageInfo(
                f"__{rank}_0.distcp", used[rank], length
            )
            used[rank] += length
        props = TensorProperties(dtype=torch.float32)
        sd_meta[fqn] = TensorStorageMetadata(props, torch.Size(leaf.shape), chunks)
    planner = {fqn: tuple(fqn.split(".")) for fqn in specs}
    md = Metadata(sd_meta, planner_data=planner, storage_data=storage, version="1.0.0")
    return len(pickle.dumps(md)), len(storage)


def project(
    model: ModelShape, worlds: Iterable[int], *, dcp_base: int = 64, statement: int = 2000
) -> dict[str, Any]:
    """The whole projection: counts and metadata bytes per world size and layout."""
    tree, specs = tensor_specs(model_state(model.parameters()))
    b_hi, e_hi = dcp_metadata(specs, dcp_base)
    b_lo, e_lo = dcp_metadata(specs, dcp_base // 2)
    per_entry = (b_hi - b_lo) / (e_hi - e_lo)
    rows = []
    for world in worlds:
        counts = projected_counts(specs, world)
        for name in LAYOUTS:
            row = {"world_size": world, "layout": name, **counts[name]}
            if name == "dcp":
                entries = row.pop("entries")
                row["entries"] = entries
                row["metadata_bytes"] = round(b_hi + (entries - e_hi) * per_entry)
                row["metadata_measured"] = world == dcp_base
            else:
                row["metadata_bytes"], parse_s = manifest(tree, specs, world, name)
                row["parse_ms"] = parse_s * 1e3
            rows.append(row)
    n_params = max(1, statement // 4)
    sub = dict(list(model.parameters().items())[:n_params])
    sub_tree, sub_specs = tensor_specs(model_state(sub))
    nbytes, parse_s = manifest(sub_tree, sub_specs, 1024, "zarrckpt v3 shard")
    return {
        "model": {**model.__dict__, "parameters": len(model.parameters()), "tensors": len(specs),
                  "fp32_bytes": sum(math.prod(s.shape) * 4 for s in specs.values())},
        "rows": rows,
        "dcp": {"base_world": dcp_base, "bytes": b_hi, "entries": e_hi,
                "bytes_per_entry": per_entry},
        "statement": {"tensors": len(sub_specs), "world_size": 1024,
                      "manifest_bytes": nbytes, "parse_ms": parse_s * 1e3},
    }  # fmt: skip
