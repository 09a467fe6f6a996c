"""The zarrckpt demo: ``python -m zarrckpt.demo [DIR]``.

1. Two gloo processes train a small FSDP2 model for a few steps and save model,
   Adam state, step counter and a data-loader position after every step with a
   ``zarrckpt.CheckpointManager`` keeping the last two steps (each rank writes
   its own shards, rank 0 commits).
2. One process opens the checkpoint offline (``zarrckpt.open``): lists tensors,
   reads one, computes per-tensor norms with dask.
3. The same process restores the newest step into an unsharded model +
   optimizer (``CheckpointManager.restore``), checks every tensor bit-exact
   against what the ranks saved, and continues training.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

STEPS = 3


class DataPosition:
    """A Stateful object: saved through state_dict(), restored through load_state_dict()."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 8),
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


def train_and_save(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Runs on each of the two ranks."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import zarrckpt

    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    position = DataPosition()
    manager = zarrckpt.CheckpointManager(root, keep_last=2)
    model_sd: Any
    optim_sd: Any
    elapsed = 0.0
    for step in range(STEPS):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optim.step()
        optim.zero_grad()
        position.batch += 1
        model_sd, optim_sd = get_state_dict(model, optim)
        state = {"model": model_sd, "optim": optim_sd, "step": step + 1, "data": position}
        start = time.perf_counter()
        manager.save(step + 1, state, metrics={"loss": loss.detach()})
        elapsed = time.perf_counter() - start
    shards = {k: list(v.to_local().shape) for k, v in model_sd.items()}
    full = {f"model.{k}": v.full_tensor().detach() for k, v in model_sd.items()}
    for fqn, st in optim_sd["state"].items():
        for name, value in st.items():
            full[f"optim.state.{fqn}.{name}"] = (
                value.full_tensor() if hasattr(value, "full_tensor") else value
            )
    return {"loss": float(loss.detach()), "seconds": elapsed, "shards": shards, "full": full}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import zarrckpt
    from zarrckpt.storage._files import make_dirs, make_temp_dir
    from zarrckpt.testing import run_distributed

    args = sys.argv[1:] if argv is None else argv
    root = args[0] if args else make_temp_dir("zarrckpt-demo-")
    make_dirs(root)
    run = os.path.join(root, "run")
    print(f"zarrckpt {zarrckpt.__version__} demo, checkpoints below {run}\n")

    print(f"1. two gloo processes train an FSDP2 model for {STEPS} steps, saving each step")
    results = run_distributed(train_and_save, 2, run)
    manager = zarrckpt.CheckpointManager(run, keep_last=2)
    path = manager.step_path(STEPS)
    for rank, r in enumerate(results):
        print(
            f"   rank {rank}: loss {r['loss']:.4f}, last save took {r['seconds'] * 1000:.0f} ms, "
            f"holds shards {r['shards']['0.weight']} of 0.weight"
        )

    print(f"   kept steps {manager.all_steps()} (keep_last=2), loss of step {STEPS}: "
          f"{manager.metrics(STEPS)['loss']:.4f}")

    print(f"\n2. open step {STEPS} offline (no torch.distributed): zarr arrays and dask")
    ckpt = zarrckpt.open(path)
    total = sum(ckpt[k].nbytes for k in ckpt)
    print(
        f"   {len(ckpt)} tensors, {total / 1024:.1f} KiB, written by "
        f"{ckpt.metadata['world_size']} ranks"
    )
    arr = ckpt["model.0.weight"]
    print(f"   model.0.weight as zarr: shape {arr.shape}, chunks {arr.chunks}, dtype {arr.dtype}")
    norms = {
        k: float((v.astype("float64") ** 2).sum() ** 0.5)
        for k, v in ckpt.to_dask("model.*").items()
    }
    import dask

    norms = dict(zip(norms, dask.compute(*norms.values()), strict=True))
    for fqn, norm in norms.items():
        print(f"   L2 norm of {fqn:<16} {norm:9.4f}  (dask, chunk by chunk)")

    print("\n3. restore the newest step into one unsharded process and keep training")
    model = make_model()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    position = DataPosition()
    model_sd: Any
    optim_sd: Any
    model_sd, optim_sd = get_state_dict(model, optim)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "step": 0, "data": position}
    restored = manager.restore(state)
    print(f"   restored step {restored}")
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved = results[0]["full"]
    model_sd, optim_sd = get_state_dict(model, optim)
    loaded = {f"model.{k}": v for k, v in model_sd.items()}
    for fqn, st in optim_sd["state"].items():
        for name, value in st.items():
            loaded[f"optim.state.{fqn}.{name}"] = value
    exact = all(torch.equal(loaded[k], v) for k, v in saved.items())
    print(f"   {len(saved)} tensors bit-exact vs. the ranks' state: {exact}")
    print(f"   step counter {state['step']}, data position batch {position.batch}")
    x, y = batch(state["step"])
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    print(f"   continued: step {state['step'] + 1} loss {float(loss.detach()):.4f}")
    if not exact or restored != STEPS or state["step"] != STEPS or position.batch != STEPS:
        print("demo FAILED", file=sys.stderr)
        return 1
    print("\ndemo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
