"""Run a function on N gloo CPU processes (for tests, examples and benchmarks).

Example
-------
>>> def work(rank, world_size, path):           # doctest: +SKIP
...     import torch, zarrckpt
...     zarrckpt.save({"x": torch.ones(2) * rank}, path)  # collective
>>> run_distributed(work, 2, "/tmp/ckpt")        # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["run_distributed", "DistributedTestError"]


class DistributedTestError(RuntimeError):
    """A rank raised, died or timed out; the message holds its traceback."""


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_file: str,
    results: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        try:
            value = fn(rank, world_size, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        # plain pickle bytes: tensors travel by value, not as shared-memory handles
        # that die with this process
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    failure_grace: float = 15.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes.

    Each process joins a gloo process group (file rendezvous, no ports) and
    uses one intra-op thread. ``fn`` must be importable (a module-level
    function) and its result picklable.

    Returns
    -------
    list
        The results in rank order.

    Raises
    ------
    DistributedTestError
        A rank raised (its traceback is in the message; ranks still running
        ``failure_grace`` seconds later, e.g. blocked in a collective the
        failed rank never joined, are stopped), exited without a result, or
        the group did not finish within ``timeout`` seconds.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    from .storage._files import new_temp_path, remove_file

    init_file = new_temp_path("zarrckpt-rdzv-")
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, init_file, results, args, kwargs),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    outcome: dict[int, tuple[bool, Any]] = {}
    failure: str | None = None
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if failure is None:
                    failure = f"timed out after {timeout:.0f}s; finished ranks: {sorted(outcome)}"
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome]
                if dead and all(p.exitcode not in (None, 0) for p in (procs[r] for r in dead)):
                    # give the queue a moment: a rank may have posted just before exiting
                    try:
                        rank, ok, value = results.get(timeout=2.0)
                    except queue.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        failure = f"rank(s) died without a result, exit codes {codes}"
                        break
                else:
                    continue
            outcome[rank] = (ok, pickle.loads(value) if ok else value)
            if not ok and failure is None:
                failure = f"rank {rank} raised:\n{value}"
                # the other ranks may be blocked in a collective the failed rank never
                # joins: give them a short grace period to report, then stop them
                deadline = min(deadline, time.monotonic() + failure_grace)
    finally:
        for p in procs:
            p.join(timeout=5 if failure is None else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        remove_file(init_file)
    if failure is not None:
        errors = [f"rank {r} raised:\n{v}" for r, (ok, v) in sorted(outcome.items()) if not ok]
        raise DistributedTestError("\n".join(errors) or failure)
    return [outcome[r][1] for r in range(world_size)]
