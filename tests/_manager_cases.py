"""Functions run on gloo ranks by tests/test_manager.py (importable by spawned processes)."""

from __future__ import annotations

import errno
from typing import Any

import torch

#: storage calls that write a checkpoint's files (whatever the layout uses)
WRITE_CALLS = ("write_file", "pwrite_all", "write_small", "write_json")


def fail_writes_on(rank: int, failing_rank: int) -> list[Any]:
    """Make this rank's checkpoint writes raise EIO while the returned switch is on."""
    from zarrckpt.storage import _posix

    switch = [False]
    if rank != failing_rank:
        return switch
    for name in WRITE_CALLS:
        real = getattr(_posix, name, None)
        if real is None:
            continue

        def hooked(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            if switch[0]:
                raise OSError(errno.EIO, f"injected I/O error in {_name}")
            return _real(*args, **kwargs)

        setattr(_posix, name, hooked)
    return switch


def background_error_next_call(rank: int, world_size: int, root: str) -> list[str]:
    """A failing background save (rank 1's writes fail) is raised by the next save,
    wait, restore and close on every rank; the manager keeps working afterwards."""
    import zarrckpt

    switch = fail_writes_on(rank, 1)
    manager = zarrckpt.CheckpointManager(root, async_save=True, keep_last=2, fsync=False)
    # several tensors: each rank writes some of them
    state = {f"w{i}": torch.arange(4.0) + i for i in range(6)}
    seen = []
    step = 0
    for call in ("save", "wait", "restore", "close"):
        switch[0] = True
        assert manager.save(step, state)
        step += 1
        try:
            if call == "save":
                manager.save(step, state)
            elif call == "restore":
                manager.restore({k: torch.zeros(4) for k in state})
            else:
                getattr(manager, call)()
            seen.append(f"{call}: no error")
        except zarrckpt.errors.ZarrCkptError as e:
            seen.append(f"{call}: {type(e).__name__}")
        switch[0] = False
        step += 1
    assert manager.save(step, state)
    manager.close()
    seen.append(f"steps {manager.all_steps()}, incomplete {manager.incomplete_steps()}")
    return seen


def retention_agreed(rank: int, world_size: int, root: str) -> list[int]:
    """Retention on 2 ranks: every rank sees the same steps afterwards."""
    import zarrckpt

    manager = zarrckpt.CheckpointManager(root, keep_last=1, keep_every=3, keep_best=1,
                                         best_metric="acc", best_mode="max", fsync=False)
    for step in range(7):
        manager.save(step, {"w": torch.full((4,), float(step))},
                     metrics={"acc": [0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6][step]})
    state = {"w": torch.zeros(4)}
    restored = manager.restore(state)
    assert restored == 6 and torch.equal(state["w"], torch.full((4,), 6.0))
    return manager.all_steps()


def two_rank_cases(rank: int, world_size: int, root: str) -> tuple[list[str], list[int]]:
    """Both cases above in one group (one process start-up)."""
    return background_error_next_call(rank, world_size, f"{root}/errors"), retention_agreed(
        rank, world_size, f"{root}/retention"
    )


def s3_state(step: int) -> dict[str, Any]:
    """The state saved at ``step`` by :func:`s3_two_ranks` (the same on every rank)."""
    g = torch.Generator().manual_seed(step)
    state: dict[str, Any] = {f"w{i}": torch.randn(40, 30, generator=g) for i in range(4)}
    state["h"] = torch.randn(64, generator=g).bfloat16()
    state["step"] = step
    return state


def s3_two_ranks(rank: int, world_size: int, url: str, options: dict[str, Any]) -> Any:
    """Every rank saves steps 0..4 below the S3 root ``url`` (async, keep_last=2), then
    restores the latest step; returns the steps listed and whether the restore matched."""
    import zarrckpt

    with zarrckpt.CheckpointManager(url, keep_last=2, async_save=True,
                                    storage_options=options) as manager:
        for step in range(5):
            assert manager.save(step, s3_state(step), metrics={"rank_count": world_size})
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1
              for k, v in s3_state(0).items()}
    restored = manager.restore(target)
    expected = s3_state(restored)
    same = all(
        torch.equal(target[k].view(torch.uint8), v.view(torch.uint8))
        if isinstance(v, torch.Tensor) else target[k] == v
        for k, v in expected.items()
    )
    return manager.all_steps(), manager.incomplete_steps(), restored, same
