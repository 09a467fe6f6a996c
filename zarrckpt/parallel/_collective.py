"""The few collectives a save or load needs, and error agreement across ranks.

Without torch.distributed (or with a one-rank group) every call is local and
exceptions propagate unchanged (a raw ``OSError`` as a
:class:`~zarrckpt.errors.StorageError` saying what failed). With several
ranks, :meth:`Comm.agree` runs a step on every rank and then exchanges success
or failure, so that when any rank fails every rank raises (the failing rank
its own zarrckpt error, a :class:`~zarrckpt.errors.StorageError` for a raw
``OSError``, the others :class:`~zarrckpt.errors.DistributedSaveError`)
instead of hanging in the next collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import DistributedSaveError, StorageError, ZarrCkptError

__all__ = ["Comm"]

T = TypeVar("T")


@dataclass
class Comm:
    """Rank, world size and collectives of one process group (or of one process)."""

    group: Any
    rank: int
    world_size: int
    #: if set, :meth:`agree` adds each step's seconds under the first word of its ``what``
    phases: dict[str, float] | None = None

    @classmethod
    def from_group(cls, process_group: Any = None) -> Comm:
        """The group to use: ``process_group``, else the default group if initialized."""
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover
            return cls(None, 0, 1)
        if not dist.is_available() or not dist.is_initialized():
            return cls(None, 0, 1)
        group = process_group if process_group is not None else dist.group.WORLD
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (in-memory, between trusted ranks)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as e:
            raise self._lost("all_gather", e) from e
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0 (None on the others)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(
            obj, out, dst=dist.get_global_rank(self.group, 0), group=self.group
        )
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(
                box, src=dist.get_global_rank(self.group, 0), group=self.group
            )
        except Exception as e:
            raise self._lost("broadcast", e) from e
        return box[0]

    def _lost(self, collective: str, error: Exception) -> DistributedSaveError:
        """The error of a collective that failed under this rank: a peer died
        (SIGKILL, OOM killer, lost node) or the group was destroyed. The backend
        raises a bare RuntimeError; callers see a zarrckpt error naming the cause."""
        return DistributedSaveError(
            f"rank {self.rank} of {self.world_size}: the {collective} collective failed, "
            f"another rank probably died or left the group: "
            f"{type(error).__name__}: {str(error).strip()}"
        )

    def agree(self, step: Callable[[], T], what: str) -> T:
        """Run ``step`` on every rank; if it failed on any rank, raise on all ranks."""
        if self.phases is None:
            return self._agree(step, what)
        start = time.perf_counter()
        try:
            return self._agree(step, what)
        finally:
            phase = what.split(" ", 1)[0]
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def _agree(self, step: Callable[[], T], what: str) -> T:
        if not self.distributed:
            try:
                return step()
            except OSError as e:  # a raw storage error: say what failed, keep errno
                raise StorageError.wrap(e, what) from e
        result: Any = None
        error: BaseException | None = None
        try:
            result = step()
        except Exception as e:  # reported to every rank below
            error = e
        statuses = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, msg) for r, msg in enumerate(statuses) if msg is not None]
        if not failed:
            return result  # type: ignore[no-any-return]
        if error is not None:
            if isinstance(error, ZarrCkptError):
                raise error
            if isinstance(error, OSError):
                raise StorageError.wrap(error, f"{what} on rank {self.rank}") from error
            raise DistributedSaveError(
                f"{what} failed on rank {self.rank}: {type(error).__name__}: {error}"
            ) from error
        summary = "; ".join(f"rank {r}: {msg}" for r, msg in failed[:4])
        raise DistributedSaveError(f"{what} failed on {len(failed)} rank(s): {summary}")
