"""The background side of ``async_save``: one worker thread, and no save lost at exit.

Async saves of a process run one at a time, in call order, on one worker
thread (the same order on every rank, so their collectives match), over a
gloo group of their own.

Pending saves are never dropped silently:

* **Interpreter exit.** A hook registered with ``threading._register_atexit``
  runs when the main thread finishes, before ``concurrent.futures`` stops
  accepting work and before non-daemon threads are joined (threading's exit
  hooks run in reverse registration order, and ``concurrent.futures``
  registers its own when it is imported, before zarrckpt's). It waits for
  every pending save. A save that failed and whose outcome nobody looked at
  (``result()`` / ``exception()``) is reported on stderr with its traceback
  (through the ``zarrckpt`` logger instead when the application has set up
  logging) and the process exits with status 1 (see :func:`_exit_status_1`).
  The background groups are then destroyed while the interpreter is alive.
  (The I/O threads of a save are plain threads, see ``_writer.parallel_map``,
  so a save running later in the shutdown still completes.)
* **destroy_process_group.** ``torch.distributed.destroy_process_group()``
  (no argument or WORLD) destroys every group, the background one included,
  so a save still running would fail. When the first distributed async save is
  submitted, ``destroy_process_group`` (the attribute of ``torch.distributed``
  and of ``torch.distributed.distributed_c10d``) is wrapped, once, so that
  destroying WORLD first waits for the pending async saves. Code holding the
  original function (``from torch.distributed import destroy_process_group``
  executed earlier) bypasses the wait; the save then fails and is reported as
  above, never lost silently.
* **fork.** A forked child starts with no pending saves and a fresh worker.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours)
import functools
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import DistributedSaveError
from ._collective import Comm
from ._log import logger

__all__ = [
    "AsyncSaveFuture",
    "submit",
    "background_comm",
    "wait_pending",
    "raise_if_group_destroyed",
]


@dataclass
class _Record:
    """One submitted save, kept until it succeeded (or until exit if it failed)."""

    path: str
    finished: threading.Event = field(default_factory=threading.Event)
    error: str | None = None  # the formatted traceback of a failure
    observed: bool = False  # result() or exception() returned its outcome


class AsyncSaveFuture(Future[None]):
    """Future of one :func:`zarrckpt.async_save`; it cannot be cancelled (the
    save is collective: every rank runs it).

    ``staged`` is a second future that resolves once the state has been copied
    out of the caller's tensors: at once for a save staged before
    :func:`~zarrckpt.async_save` returned, later for one staged in turns within a
    staging budget (the caller must not modify its tensors before it resolves).
    """

    def __init__(self, record: _Record) -> None:
        super().__init__()
        self._record = record
        self.staged: Future[None] = Future()

    def result(self, timeout: float | None = None) -> None:
        try:
            return super().result(timeout)
        finally:
            if self.done():
                self._record.observed = True

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        finally:
            if self.done():
                self._record.observed = True

    def cancel(self) -> bool:
        return False


_LOCK = threading.Lock()
_EXECUTOR: ThreadPoolExecutor | None = None
_RECORDS: list[_Record] = []
_GROUPS: dict[tuple[int, ...], Any] = {}
_HOOKS: set[str] = set()
_IN_WORKER = threading.local()


def _after_fork_in_child() -> None:
    global _LOCK, _EXECUTOR
    _LOCK = threading.Lock()
    _EXECUTOR = None
    _RECORDS.clear()
    _GROUPS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def submit(
    job: Callable[[Callable[[], None]], None],
    path: str,
    *,
    distributed: bool,
    staged: bool = True,
) -> AsyncSaveFuture:
    """Run ``job(mark_staged)`` on the async worker; its future resolves when ``job``
    returns. ``future.staged`` resolves at once when ``staged`` (the state was
    staged before this call), else when the job calls ``mark_staged()`` (or ends)."""
    record = _Record(path)
    future = AsyncSaveFuture(record)
    if staged:
        future.staged.set_result(None)

    def mark_staged() -> None:
        if not future.staged.done():
            future.staged.set_result(None)

    def run() -> None:
        future.set_running_or_notify_cancel()
        _IN_WORKER.active = True
        try:
            job(mark_staged)
        except BaseException as e:
            record.error = "".join(traceback.format_exception(e))
            if not future.staged.done():
                future.staged.set_exception(e)
            future.set_exception(e)
        else:
            mark_staged()
            future.set_result(None)
            with _LOCK:
                _RECORDS.remove(record)
        finally:
            _IN_WORKER.active = False
            record.finished.set()

    global _EXECUTOR
    with _LOCK:
        _install_exit_hook()
        if distributed:
            _install_destroy_wait()
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="zarrckpt-async")
        _RECORDS.append(record)
        try:
            _EXECUTOR.submit(run)
        except BaseException:
            _RECORDS.remove(record)
            raise
    return future


def wait_pending() -> list[_Record]:
    """Wait for every submitted save (also those submitted meanwhile by other
    threads); return those that failed."""
    if getattr(_IN_WORKER, "active", False):
        return []  # called from within a save: waiting would deadlock
    while True:
        with _LOCK:
            records = list(_RECORDS)
        if all(r.finished.is_set() for r in records):
            return [r for r in records if r.error is not None]
        for r in records:
            r.finished.wait()


def background_comm(comm: Comm) -> Comm:
    """A gloo group of the same ranks, used only by background saves so their
    collectives never interleave with the training's."""
    if not comm.distributed:
        return comm
    import torch.distributed as dist

    ranks = tuple(dist.get_process_group_ranks(comm.group))
    group = _GROUPS.get(ranks)
    world = getattr(dist.distributed_c10d, "_world", None)
    if group is not None and world is not None and group not in world.pg_map:
        group = None  # destroyed (the default group was destroyed and created again)
    if group is None:
        group = _GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo")
    return Comm(group, dist.get_rank(group), dist.get_world_size(group))


def raise_if_group_destroyed(comm: Comm, path: str, error: BaseException) -> None:
    """Explain a background save's ``error`` caused by the destruction of its group."""
    if not comm.distributed:
        return
    import torch.distributed as dist

    world = getattr(dist.distributed_c10d, "_world", None)
    if world is not None and comm.group not in world.pg_map:
        raise DistributedSaveError(
            f"async_save of {path!r} failed: its process group was destroyed while the save "
            "was running (destroy_process_group called through a reference taken before "
            "zarrckpt wrapped it?); wait for the save's future before destroying the group. "
            f"{type(error).__name__}: {error}"
        ) from error


# --------------------------------------------------------------------------- exit


def _install_exit_hook() -> None:
    if "exit" in _HOOKS:
        return
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(_at_exit)
    else:  # pragma: no cover - other interpreters: later than ideal, still loud
        atexit.register(_at_exit, in_atexit=True)
    _HOOKS.add("exit")


def _at_exit(*, in_atexit: bool = False) -> None:
    with _LOCK:
        waiting = [r.path for r in _RECORDS if not r.finished.is_set()]
    if waiting:
        logger.info(
            "waiting for %d pending async_save(s) before exiting: %s", len(waiting), waiting
        )
    try:
        failed = wait_pending()
    except KeyboardInterrupt:
        with _LOCK:
            unfinished = [r.path for r in _RECORDS if not r.finished.is_set()]
        _report(
            "interrupted while waiting for pending async_save(s) at exit; "
            f"not committed: {unfinished}"
        )
        _exit_status_1(in_atexit)
        return
    _destroy_background_groups()
    lost = [r for r in failed if not r.observed]
    for r in lost:
        _report(
            f"async_save of {r.path!r} failed and nobody called result() on its future before "
            f"the process exited; the checkpoint was NOT written:\n{r.error}"
        )
    if lost:
        _exit_status_1(in_atexit)


def _destroy_background_groups() -> None:
    """Destroy the background groups while the interpreter is fully alive: gloo
    threads still holding a finished collective's tensors when the interpreter
    is torn down abort the process (pytorch/pytorch#190489). Local for gloo."""
    groups = list(_GROUPS.values())
    _GROUPS.clear()
    if not groups:
        return
    import torch.distributed as dist

    world = getattr(dist.distributed_c10d, "_world", None)
    for group in groups:
        if world is None or group not in world.pg_map:
            continue  # already destroyed with the default group
        try:
            dist.destroy_process_group(group)
        except Exception:  # the exit goes on; the saves are done
            logger.debug("could not destroy an async_save group at exit", exc_info=True)


def _visible_in_logging() -> bool:
    """Whether an ERROR record of the zarrckpt logger reaches a real handler."""
    if not logger.isEnabledFor(logging.ERROR):
        return False
    current: Any = logger
    while current is not None:
        for handler in current.handlers:
            if not isinstance(handler, logging.NullHandler) and handler.level <= logging.ERROR:
                return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _report(message: str) -> None:
    visible = _visible_in_logging()
    logger.error("%s", message.rstrip())
    if not visible and sys.stderr is not None:
        sys.stderr.write(f"zarrckpt: ERROR: {message.rstrip()}\n")
        sys.stderr.flush()


def _exit_status_1(in_atexit: bool) -> None:
    """Make the process exit with status 1 once the normal exit work is done.

    Python offers no way to change the exit status of an exiting interpreter
    but ``os._exit``. It is called from an ``atexit`` handler registered now
    (threading's exit hooks run before ``atexit`` handlers), which first runs
    every other ``atexit`` handler in their usual order (``logging.shutdown``,
    multiprocessing's child reaping, torch's) and flushes stdout and stderr.
    By then every non-daemon thread has been joined; only the interpreter's
    final teardown is skipped, as in every process ``multiprocessing`` forks.
    A process that ends with ``os._exit`` or a signal keeps its status (the
    error is still reported).
    """

    def exit_1() -> None:
        atexit.unregister(exit_1)
        try:
            run_others = getattr(atexit, "_run_exitfuncs", None)
            if run_others is not None:
                run_others()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    if stream is not None:
                        stream.flush()
                except Exception:  # a closed stream must not block the exit
                    pass
            os._exit(1)

    if in_atexit:  # pragma: no cover - the fallback of _install_exit_hook
        exit_1()
    else:
        atexit.register(exit_1)


# --------------------------------------------------------------------------- destroy


def _install_destroy_wait() -> None:
    if "destroy" in _HOOKS:
        return
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    original = c10d.destroy_process_group

    @functools.wraps(original)
    def destroy_process_group(group: Any = None) -> Any:
        # zarrckpt: destroying WORLD destroys the group of the background async
        # saves too; let the pending ones finish first
        if group is None or group == c10d.GroupMember.WORLD:
            wait_pending()
            _GROUPS.clear()
        return original(group)

    for module in (c10d, dist):
        if getattr(module, "destroy_process_group", None) is original:
            setattr(module, "destroy_process_group", destroy_process_group)  # noqa: B010
    _HOOKS.add("destroy")
