"""Benchmark workloads: state dicts to save and load, registered by name.

A workload builder takes a size (``"full"``, ``"quick"`` or ``"tiny"``) and
returns a :class:`Workload`: the nested state dict that checkpoint libraries
with nested-dict support receive (zarrckpt, torch.save, DCP) and its tensor
leaves flattened by FQN for the flat formats (safetensors, tensorstore, the
raw numpy bound). Data is generated from a fixed seed.

Add a workload with :func:`register_workload`; ``kind`` names the runner that
measures it: ``"single"`` (one process, :mod:`benchmarks._worker`),
``"async"`` (one process, :mod:`benchmarks.async_save`) or ``"distributed"``
(gloo process groups, :mod:`benchmarks.distributed`; its builder returns a
:class:`ShardedWorkload`, the recipe every rank builds its shards from).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Workload",
    "ShardedWorkload",
    "WorkloadSpec",
    "WORKLOADS",
    "ALIASES",
    "SIZES",
    "register_workload",
    "flatten_tensors",
    "resolve_workload",
]

SIZES = ("full", "quick", "tiny")


@dataclass
class Workload:
    """One state dict to checkpoint.

    Attributes
    ----------
    name, description
        Registry name and a one-line description (with sizes).
    state_dict
        Nested state dict (may hold plain values besides tensors).
    flat
        Its tensor leaves by FQN (``"a.b.0.c"``), contiguous CPU tensors.
    """

    name: str
    description: str
    state_dict: dict[str, Any]
    flat: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.flat:
            self.flat = flatten_tensors(self.state_dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what every system has to move)."""
        return sum(t.numel() * t.element_size() for t in self.flat.values())

    @property
    def n_tensors(self) -> int:
        return len(self.flat)

    def info(self) -> dict[str, Any]:
        dtypes: dict[str, int] = {}
        for t in self.flat.values():
            key = str(t.dtype).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + t.numel() * t.element_size()
        return {
            "name": self.name,
            "description": self.description,
            "nbytes": self.nbytes,
            "n_tensors": self.n_tensors,
            "bytes_by_dtype": dtypes,
        }


@dataclass(frozen=True)
class ShardedWorkload:
    """A distributed workload: fp32 matrices sharded on dim 0 (FSDP2 ``Shard(0)``).

    Every rank builds its own shards from ``shapes`` (values are a fixed
    function of the tensor index, so any rank can compute any slice).

    Attributes
    ----------
    name, description
        Registry name and one-line description.
    shapes
        Global shape of each tensor (``layers.{i}.weight``).
    world_sizes
        Process counts involved: ``(2,)`` or ``(4,)`` for an FSDP2 workload,
        ``(4, 2)`` for resharding; the largest sizes the process group.
    """

    name: str
    description: str
    shapes: tuple[tuple[int, int], ...]
    world_sizes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(r * c * 4 for r, c in self.shapes)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "nbytes": self.nbytes,
            "n_tensors": len(self.shapes),
            "bytes_by_dtype": {"float32": self.nbytes},
            "world_sizes": list(self.world_sizes),
        }


@dataclass(frozen=True)
class WorkloadSpec:
    """A registered workload: name, description, builder and runner kind."""

    name: str
    description: str
    build: Callable[[str], Any]
    kind: str = "single"


WORKLOADS: dict[str, WorkloadSpec] = {}
ALIASES: dict[str, str] = {}


def register_workload(
    name: str, description: str, *, alias: str | None = None, kind: str = "single"
) -> Callable[[Callable[[str], Any]], Callable[[str], Any]]:
    """Decorator registering ``builder(size) -> Workload`` (``ShardedWorkload``
    for distributed workloads) under ``name``."""

    def deco(builder: Callable[[str], Any]) -> Callable[[str], Any]:
        WORKLOADS[name] = WorkloadSpec(name, description, builder, kind)
        if alias:
            ALIASES[alias] = name
        return builder

    return deco


def resolve_workload(name: str) -> str:
    """Registry name of a workload given its name or alias."""
    name = ALIASES.get(name, name)
    if name not in WORKLOADS:
        known = ", ".join(f"{a} ({n})" for a, n in ALIASES.items())
        raise KeyError(f"unknown workload {name!r}; known: {known}")
    return name


def flatten_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensor leaves of a nested dict/list by dotted FQN (plain values dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in _items(tree):
        fqn = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            out[fqn] = value
        elif isinstance(value, (dict, list, tuple)):
            out.update(flatten_tensors(value, fqn))
    return out


def _items(tree: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(tree, dict):
        return iter(tree.items())
    if isinstance(tree, (list, tuple)):
        return iter(enumerate(tree))
    return iter(())


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float32).to(dtype)


# --------------------------------------------------------------------------- (a)

_LARGE = {
    # size: (fp32 count, fp32 shape, bf16 count, bf16 shape)
    "full": (6, (8192, 8192), 4, (8192, 8192)),  # 1.5 GiB fp32 + 0.5 GiB bf16
    "quick": (3, (2048, 4096), 2, (2048, 4096)),  # 96 MiB + 32 MiB
    "tiny": (3, (512, 512), 2, (512, 512)),  # 3 MiB + 1 MiB
}


@register_workload(
    "large_tensors",
    "large fp32 tensors plus a bf16 part (full ~2 GiB, quick 256 MiB)",
    alias="a",
)
def large_tensors(size: str) -> Workload:
    """(a) A few large fp32 matrices and a bf16 part."""
    n32, s32, n16, s16 = _LARGE[size]
    gen = _generator(1)
    sd: dict[str, Any] = {}
    for i in range(n32):
        sd[f"fp32.{i}.weight"] = _rand(s32, torch.float32, gen)
    for i in range(n16):
        sd[f"bf16.{i}.weight"] = _rand(s16, torch.bfloat16, gen)
    mib = sum(t.numel() * t.element_size() for t in sd.values()) >> 20
    return Workload(
        "large_tensors",
        f"{n32} fp32 {list(s32)} + {n16} bf16 {list(s16)} ({mib} MiB)",
        sd,
    )


# --------------------------------------------------------------------------- (b)

_SMALL = {"full": 1000, "quick": 500, "tiny": 50}


@register_workload(
    "small_tensors",
    "fp32 tensors of 16 KiB each (full: 1,000, the issue's target; quick 500)",
    alias="b",
)
def small_tensors(size: str) -> Workload:
    """(b) Many small 1-D tensors (biases, norms): 16 KiB each."""
    n = _SMALL[size]
    gen = _generator(2)
    sd = {f"layers.{i}.norm.weight": _rand((4096,), torch.float32, gen) for i in range(n)}
    return Workload("small_tensors", f"{n} fp32 tensors of 16 KiB ({n * 16} KiB)", sd)


# --------------------------------------------------------------------------- (c)

_GPT_SIZES = {
    # size: (vocab, d_model, layers, context)
    "full": (32000, 768, 8, 1024),
    "quick": (8000, 256, 4, 256),
    "tiny": (1000, 64, 2, 64),
}


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)


class _GPT(torch.nn.Module):
    """Parameter shapes of a GPT-2-style decoder (no forward needed here)."""

    def __init__(self, vocab: int, d: int, layers: int, context: int) -> None:
        super().__init__()
        self.tok_emb = torch.nn.Embedding(vocab, d)
        self.pos_emb = torch.nn.Embedding(context, d)
        self.blocks = torch.nn.ModuleList(_Block(d) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)


@register_workload(
    "transformer_adam",
    "GPT-style model + Adam state via get_state_dict (full ~1.3 GB)",
    alias="c",
)
def transformer_adam(size: str) -> Workload:
    """(c) A transformer-shaped model and its Adam state (one optimizer step taken)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    vocab, d, layers, context = _GPT_SIZES[size]
    torch.manual_seed(3)
    with torch.no_grad():
        model = _GPT(vocab, d, layers, context)
        for p in model.parameters():
            p.grad = torch.rand_like(p).sub_(0.5).mul_(1e-3)
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)
    optim.step()
    model.zero_grad(set_to_none=True)
    model_sd, optim_sd = get_state_dict(model, optim)
    sd = {"model": model_sd, "optim": optim_sd}
    wl = Workload("transformer_adam", "", sd)
    n_params = sum(p.numel() for p in model.parameters())
    wl.description = (
        f"GPT vocab={vocab} d={d} layers={layers}: {n_params / 1e6:.1f} M params + Adam "
        f"({wl.n_tensors} tensors, {wl.nbytes >> 20} MiB)"
    )
    return wl


# --------------------------------------------------------------------------- (d), (e)

_SHARDED = {
    # size: (rows, cols, count) of fp32 matrices; the last one has 3 extra rows so
    # that its shards are uneven (ceil(n/k) boundaries)
    "full": (4096, 2048, 32),  # 1 GiB
    "quick": (2048, 2048, 4),  # 64 MiB
    "tiny": (512, 4096, 4),  # 32 MiB
}


def _sharded_shapes(size: str, fraction: int = 1) -> tuple[tuple[int, int], ...]:
    rows, cols, count = _SHARDED[size]
    count = max(2, count // fraction)
    return tuple((rows, cols) for _ in range(count - 1)) + ((rows + 3, cols),)


def _sharded(name: str, size: str, world_sizes: tuple[int, ...], what: str) -> ShardedWorkload:
    shapes = _sharded_shapes(size, 4 if name == "reshard" else 1)
    mib = sum(r * c * 4 for r, c in shapes) / (1 << 20)
    return ShardedWorkload(
        name, f"{what}: {len(shapes)} fp32 matrices, {mib:.0f} MiB", shapes, world_sizes
    )


@register_workload(
    "fsdp2_2ranks",
    "FSDP2 (Shard(0) DTensors) save/load on 2 gloo processes (full 1 GiB)",
    alias="d2",
    kind="distributed",
)
def fsdp2_2ranks(size: str) -> ShardedWorkload:
    """(d) FSDP2 state saved and loaded by 2 processes."""
    return _sharded("fsdp2_2ranks", size, (2,), "FSDP2 Shard(0) on 2 gloo processes")


@register_workload(
    "fsdp2_4ranks",
    "FSDP2 (Shard(0) DTensors) save/load on 4 gloo processes (full 1 GiB)",
    alias="d4",
    kind="distributed",
)
def fsdp2_4ranks(size: str) -> ShardedWorkload:
    """(d) FSDP2 state saved and loaded by 4 processes."""
    return _sharded("fsdp2_4ranks", size, (4,), "FSDP2 Shard(0) on 4 gloo processes")


@register_workload(
    "reshard",
    "resharding loads 4 -> 2 and 2 -> 4 ranks: time and bytes read per rank (full 256 MiB)",
    alias="e",
    kind="distributed",
)
def reshard(size: str) -> ShardedWorkload:
    """(e) Checkpoints saved by 4 (2) ranks loaded by 2 (4) ranks."""
    return _sharded("reshard", size, (4, 2), "saved by 4 / 2 ranks, loaded by 2 / 4")


# --------------------------------------------------------------------------- (f)


@register_workload(
    "async_save",
    "async_save of (c)'s model + Adam: time the caller is blocked vs a host copy",
    alias="f",
    kind="async",
)
def async_save(size: str) -> Workload:
    """(f) The transformer + Adam state of (c), saved in the background."""
    wl = transformer_adam(size)
    wl.name = "async_save"
    return wl
