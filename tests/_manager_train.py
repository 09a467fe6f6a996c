"""One rank of a small deterministic FSDP2 training run that checkpoints with a
CheckpointManager, for tests/test_manager_crash.py.

Run as ``python tests/_manager_train.py CONFIG_JSON RANK``. The run resumes from
the newest committed step below ``root`` (if any), trains up to ``steps``
steps, saves every step, and appends ``step loss.hex()`` lines (rank 0) to
``losses``. A ``kill`` spec makes one rank SIGKILL the whole process group
(every rank of the job) at a chosen point:

* ``{"kind": "save", "skip": S, "call": K, "rank": R}``: at the K-th
  write-side storage call (``_posix`` writes, fsyncs, mkdirs) on rank R from
  the save of the (S+1)-th step this job trains on (in the background thread
  with ``async``);
* ``{"kind": "retention", "skip": S, "call": K, "after": bool}``: at the
  K-th ``remove_tree`` on rank 0 (before it, or after it with ``after``) from
  the save of the (S+1)-th step this job trains on.

Every rank computes the full batch, so a step's arithmetic does not depend
on the world size (FSDP2 averages identical gradients exactly) and runs with
different world sizes give bit-identical losses.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import torch


class DataPosition:
    """A data loader's position (Stateful)."""

    def __init__(self) -> None:
        self.index = 0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.index)
        return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = state["index"]


class TrainState:
    """Model + optimizer (Stateful through DCP's state-dict helpers)."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optim, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


_ARMED = threading.Event()
_CALLS = [0]
_LOCK = threading.Lock()


def _kill_all() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _install_kill(spec: dict[str, Any], rank: int) -> None:
    from zarrckpt.storage import _posix

    def wrap(name: str, before: bool) -> None:
        real = getattr(_posix, name)

        def hooked(*args: Any, **kwargs: Any) -> Any:
            if _ARMED.is_set():
                with _LOCK:
                    _CALLS[0] += 1
                    hit = _CALLS[0] == spec["call"]
                if hit and before:
                    _kill_all()
                result = real(*args, **kwargs)
                if hit:
                    _kill_all()
                return result
            return real(*args, **kwargs)

        setattr(_posix, name, hooked)

    if spec["kind"] == "save" and rank == spec["rank"]:
        for name in ("write_file", "pwrite_all", "write_small", "write_json", "fsync_path",
                     "mkdir_fast", "sync_tree"):
            if hasattr(_posix, name):
                wrap(name, before=True)
    elif spec["kind"] == "retention" and rank == 0:
        wrap("remove_tree", before=not spec.get("after", False))


def main() -> None:
    config = json.loads(sys.argv[1])
    rank = int(sys.argv[2])
    world_size = config["world_size"]
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import zarrckpt

    dist.init_process_group("gloo", init_method=f"file://{config['rendezvous']}",
                            rank=rank, world_size=world_size)
    kill = config.get("kill")
    if kill:
        _install_kill(kill, rank)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optim = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    data = DataPosition()
    state = {"train": TrainState(model, optim), "sched": sched, "data": data}
    manager = zarrckpt.CheckpointManager(config["root"], keep_last=2, fsync=False,
                                         async_save=config["async"])
    start = 0
    if manager.latest_step() is not None:
        start = manager.restore(state) + 1
    losses = open(config["losses"], "a") if rank == 0 else None  # noqa: SIM115
    for step in range(start, config["steps"]):
        x, y = data.batch()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optim.step()
        optim.zero_grad()
        sched.step()
        data.index += 1
        if losses is not None:
            losses.write(f"{step} {float(loss.detach()).hex()}\n")
            losses.flush()
        if kill and step >= start + kill["skip"]:
            _ARMED.set()
        manager.save(step, state, metrics={"loss": loss.detach()})
    manager.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
