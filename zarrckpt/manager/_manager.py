"""``CheckpointManager``: step checkpoints below one root, retention, resume, async saves."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any, Literal

from .. import api
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    DistributedSaveError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ZarrCkptError,
)
from ..format._layout import DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES
from ..parallel._collective import Comm
from ..storage._local import open_store
from ..storage._paths import check_path
from . import _steps
from ._retention import steps_to_delete

__all__ = ["CheckpointManager"]

logger = logging.getLogger("zarrckpt")


def _check_count(name: str, value: int | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive int or None, got {value!r}")


class CheckpointManager:
    """Saves a training state every few steps below one root, keeps some, and resumes.

    Each saved step is a normal zarrckpt checkpoint ``<root>/step_<zero-padded
    step>`` (``zarrckpt.load``, ``zarrckpt.open`` and the command line work on
    it) whose manifest holds the step and its metrics
    (``zarrckpt.open(path).metadata["manager"]``). :meth:`save`,
    :meth:`restore`, :meth:`wait` and :meth:`close` are collective: every rank
    of ``process_group`` calls them in the same order. One manager (one job)
    writes to a root at a time.

    Parameters
    ----------
    root
        Directory holding the step checkpoints (created on the first save), or
        an object-store URL (``s3://bucket/prefix``: the steps are prefixes below it).
    keep_last
        Keep the ``keep_last`` newest committed steps.
    keep_every
        Also keep every step divisible by ``keep_every``, forever.
    keep_best
        Also keep the ``keep_best`` steps with the best ``best_metric``.
    best_metric, best_mode
        The metric (a key of ``save(..., metrics=...)``) and whether smaller
        (``"min"``) or larger (``"max"``) is better.
    save_every
        :meth:`save` saves the steps divisible by ``save_every`` (others only
        with ``force=True``).
    async_save
        Save in the background (:func:`zarrckpt.async_save`): at most one save is
        in flight; the next one waits for it first.
    process_group
        The ranks taking part (default: the default group when initialized).
    fsync
        Make each checkpoint durable before its commit marker is written.
    step_digits
        Zero-padding of the step in directory names.
    storage_options
        Options for remote stores (as for :func:`zarrckpt.save`), used for every
        request the manager makes (saves, restores, listings, deletions).

    Notes
    -----
    Retention runs after a new step has committed (for async saves: at the
    next collective call), is decided on rank 0 and agreed by every rank, and
    never deletes the newest committed step. With ``keep_last`` and
    ``keep_best`` both None nothing is deleted. A step checkpoint loses its
    commit marker before the rest is removed, so a job killed while deleting
    leaves an incomplete step, which is never restored.

    Attributes
    ----------
    last_wait_seconds : float
        Seconds the last :meth:`save` (or :meth:`wait`) waited for the save in flight.
    """

    def __init__(
        self,
        root: str | Any,
        *,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        save_every: int = 1,
        async_save: bool = False,
        process_group: Any = None,
        fsync: bool = True,
        step_digits: int = 8,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.root = check_path(root, storage_options=storage_options, role="manager root")
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every),
                            ("keep_best", keep_best)):
            _check_count(name, value)
        _check_count("save_every", save_every, allow_none=False)
        _check_count("step_digits", step_digits, allow_none=False)
        if keep_best is not None and best_metric is None:
            raise InvalidArgumentError("keep_best needs best_metric (the metric to rank by)")
        if best_mode not in ("min", "max"):
            raise InvalidArgumentError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.save_every = save_every
        self.async_save = async_save
        self.process_group = process_group
        self.fsync = fsync
        self.step_digits = step_digits
        self.storage_options = storage_options
        self.last_wait_seconds = 0.0
        self._pending: tuple[int, Future[None]] | None = None
        self._metrics_cache: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ listing

    def _store(self) -> Any:
        return open_store(self.root)

    def _scan(self) -> dict[int, _steps.StepEntry]:
        return _steps.scan_steps(self._store())

    def step_path(self, step: int) -> str:
        """Where ``step`` is (or would be) saved: ``<root>/step_<zero-padded step>``."""
        return _steps.child_location(self.root, _steps.step_name(step, self.step_digits))

    def all_steps(self) -> list[int]:
        """The committed steps, ascending (a save in flight is not among them)."""
        return [s for s, e in self._scan().items() if e.committed]

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def incomplete_steps(self) -> list[int]:
        """Steps whose save never committed (killed), ascending; the step of this
        manager's save in flight is not listed."""
        in_flight = self._pending[0] if self._pending is not None else None
        return [s for s, e in self._scan().items() if not e.committed and s != in_flight]

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics stored with the committed ``step`` (``{}`` when saved without).

        Raises
        ------
        zarrckpt.errors.CheckpointNotFoundError, IncompleteCheckpointError
            ``step`` is not a committed step.
        """
        if step not in self._metrics_cache:
            entry = self._scan().get(step)
            if entry is None or not entry.committed:
                self._raise_not_committed(step, entry)
            assert entry is not None
            manifest = _steps.read_manifest(self.root, entry.names[0])
            self._metrics_cache[step] = _steps.stored_metrics(manifest)
        return dict(self._metrics_cache[step])

    def _raise_not_committed(self, step: int, entry: _steps.StepEntry | None) -> None:
        where = f"{self.root!r} ({_steps.describe_root(self.root)})"
        if entry is not None:
            raise IncompleteCheckpointError(
                f"step {step} below {where} is incomplete: its save never committed"
            )
        raise CheckpointNotFoundError(f"no step {step} below {where}")

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, *, metrics: dict[str, Any] | None = None,
             force: bool = False) -> bool:
        """Save ``state`` as ``step`` when due (collective).

        A step is due when ``step % save_every == 0`` or ``force``. A due save
        first waits for the save in flight (``last_wait_seconds``; an error of
        that save is raised here, on every rank, and ``state`` is not saved),
        removes incomplete steps left by killed saves, then saves (in the
        background with ``async_save``) and, once the step has committed,
        applies retention.

        Parameters
        ----------
        step
            The training step (an int >= 0).
        state
            The state dict, as for :func:`zarrckpt.save` (Stateful objects welcome).
        metrics
            JSON values stored with the step (numbers, 0-d tensors, strings);
            ``best_metric`` ranks steps for ``keep_best``.
        force
            Save even when the step is not due.

        Returns
        -------
        bool
            True when the step was saved (or, with ``async_save``, submitted).

        Raises
        ------
        zarrckpt.errors.CheckpointExistsError
            ``step`` is already committed (an incomplete one is replaced).
        zarrckpt.errors.UnsupportedValueError
            ``metrics`` holds a value that is not JSON.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidArgumentError(f"step must be an int >= 0, got {step!r}")
        if not force and step % self.save_every != 0:
            return False
        stored = _steps.encode_metrics(metrics, step=step)
        comm = self._comm()
        self.last_wait_seconds = self._finish_pending(comm)

        def prepare() -> bool:
            if not comm.is_coordinator:
                return False
            steps = self._scan()
            entry = steps.get(step)
            if entry is not None and entry.committed:
                return True
            for leftover in _leftovers(steps):
                logger.info("removing the incomplete %s below %s", leftover, self.root)
                _steps.remove_entry(self.root, leftover)
            return False

        exists = comm.broadcast(comm.agree(prepare, f"preparing step {step} below {self.root!r}"))
        if exists:
            raise CheckpointExistsError(
                f"step {step} is already saved at {self.step_path(step)!r}; a manager never "
                "overwrites a committed step (restore it, or delete it first)"
            )
        extra = {_steps.MANIFEST_MEMBER: {"step": step, "metrics": stored}}
        options = api.save_options(False, False, self.fsync, DEFAULT_CHUNK_BYTES,
                                   DEFAULT_INNER_BYTES, None)
        path = self.step_path(step)
        self._metrics_cache.pop(step, None)
        if self.async_save:
            future = api.async_save_with_extra(
                state, path, options, self.process_group, self.storage_options, extra=extra
            )
            self._pending = (step, future)
        else:
            api.save_with_extra(
                state, path, options, self.process_group, self.storage_options, extra=extra
            )
            self._apply_retention(comm)
        return True

    def _comm(self) -> Comm:
        return Comm.from_group(self.process_group)

    def _finish_pending(self, comm: Comm) -> float:
        """Wait for the save in flight, raise its error, apply retention; return seconds waited."""
        if self._pending is None:
            return 0.0
        step, future = self._pending
        start = time.perf_counter()
        try:
            error = future.exception()
        finally:
            waited = time.perf_counter() - start
        self._pending = None
        if waited > 0.001:
            logger.info("waited %.3f s for the async save of step %d", waited, step)
        if error is not None:
            if isinstance(error, ZarrCkptError):
                raise error
            raise DistributedSaveError(
                f"the background save of step {step} to {self.step_path(step)!r} failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        self._apply_retention(comm)
        return waited

    def _apply_retention(self, comm: Comm) -> list[int]:
        """Delete the steps retention drops (decided on rank 0, agreed, deleted by rank 0)."""
        if self.keep_last is None and self.keep_best is None:
            return []

        def decide() -> list[int]:
            if not comm.is_coordinator:
                return []
            committed = self.all_steps()
            values: dict[int, Any] = {}
            if self.keep_best is not None and self.best_metric is not None:
                values = {s: self.metrics(s).get(self.best_metric) for s in committed}
            return steps_to_delete(
                committed, keep_last=self.keep_last, keep_every=self.keep_every,
                keep_best=self.keep_best, metric_values=values, best_mode=self.best_mode,
            )

        doomed: list[int] = comm.broadcast(
            comm.agree(decide, f"deciding retention below {self.root!r}")
        )

        def delete() -> None:
            if not comm.is_coordinator:
                return
            steps = self._scan()
            for step in doomed:
                for name in steps[step].names if step in steps else []:
                    _steps.remove_entry(self.root, name)
                self._metrics_cache.pop(step, None)

        if doomed:
            logger.info("retention removes steps %s below %s", doomed, self.root)
            comm.agree(delete, f"removing old steps {doomed} below {self.root!r}")
        return doomed

    # ------------------------------------------------------------------ restoring

    def restore(self, state: Any, step: int | None = None, *, strict: bool = True) -> int:
        """Load the newest committed step (or ``step``) into ``state`` in place (collective).

        Waits for the save in flight first (raising its error). Any world size
        and sharding can restore a step saved by any other, as with
        :func:`zarrckpt.load`; incomplete steps are never restored.

        Returns
        -------
        int
            The step restored.

        Raises
        ------
        zarrckpt.errors.CheckpointNotFoundError
            No committed step below the root (or no step ``step``).
        zarrckpt.errors.IncompleteCheckpointError
            ``step`` was given and its save never committed.
        """
        comm = self._comm()
        self._finish_pending(comm)

        def choose() -> tuple[int | None, str, str]:
            if not comm.is_coordinator:
                return None, "", ""
            steps = self._scan()
            if step is None:
                committed = [s for s, e in steps.items() if e.committed]
                if not committed:
                    incomplete = sorted(steps)
                    return None, "CheckpointNotFoundError", (
                        f"no committed step to restore below {self.root!r}"
                        + (f" (incomplete steps {incomplete[-8:]} are never restored)"
                           if incomplete else "")
                    )
                return committed[-1], "", ""
            entry = steps.get(step)
            if entry is None or not entry.committed:
                try:
                    self._raise_not_committed(step, entry)
                except ZarrCkptError as e:
                    return None, type(e).__name__, str(e)
            return step, "", ""

        chosen, kind, message = comm.broadcast(
            comm.agree(choose, f"choosing a step below {self.root!r}")
        )
        if chosen is None:
            if kind == "IncompleteCheckpointError":
                raise IncompleteCheckpointError(message)
            raise CheckpointNotFoundError(message)
        api.load(state, self.step_path(chosen), process_group=self.process_group,
                 strict=strict, storage_options=self.storage_options)
        return int(chosen)

    # ------------------------------------------------------------------ lifetime

    def wait(self) -> float:
        """Wait for the save in flight (collective); raise its error; apply retention.

        Returns
        -------
        float
            Seconds waited.
        """
        self.last_wait_seconds = self._finish_pending(self._comm())
        return self.last_wait_seconds

    def close(self) -> None:
        """Wait for the save in flight (as :meth:`wait`). The manager stays usable."""
        self.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        # leaving on an error: wait for the save in flight without collectives of our
        # own (another rank may be gone) and report its error without masking ``exc``
        pending, self._pending = self._pending, None
        if pending is not None:
            error = pending[1].exception()
            if error is not None:
                logger.error("the background save of step %d failed: %s",
                             pending[0], error)

    def __repr__(self) -> str:
        return f"<zarrckpt.CheckpointManager {self.root!r}>"


def _leftovers(steps: dict[int, _steps.StepEntry]) -> list[str]:
    """Entries of killed saves: every entry of an incomplete step, the stagings of a
    committed one."""
    names: list[str] = []
    for entry in steps.values():
        names.extend(entry.names[1:] if entry.committed else entry.names)
    return names
