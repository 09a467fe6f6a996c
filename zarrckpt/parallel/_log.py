"""Reports of saves and loads through ``logging.getLogger("zarrckpt")``.

* INFO, on rank 0 of the group: one line per ``save``, ``load`` and
  ``async_save`` (what, path, tensors, bytes, seconds, MB/s; for
  ``async_save`` also the seconds the caller was blocked staging and the
  seconds until the checkpoint was committed).
* DEBUG, on every rank: the bytes this rank wrote or read and the seconds of
  each phase (named by :meth:`Comm.agree` steps: preparing, staging, planning,
  writing, committing, reading).

Every record carries the numbers as a dict in ``record.zarrckpt``. The library
only adds a :class:`logging.NullHandler`: nothing is printed unless the
application configures logging.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from ._collective import Comm
from ._reader import ReadRequest
from ._save import SaveReport

__all__ = ["logger", "Operation"]

logger = logging.getLogger("zarrckpt")
logger.addHandler(logging.NullHandler())


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds if seconds > 0 else 0.0


class Operation:
    """Times one save, load or async_save and logs it when it finishes.

    The phases are the :meth:`Comm.agree` steps of the comms it watches.
    """

    def __init__(self, what: str, path: str, comm: Comm) -> None:
        self.what = what
        self.path = path
        self.comm = comm
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.blocked: float | None = None
        self.watch(comm)

    def watch(self, comm: Comm) -> Comm:
        """Count the :meth:`Comm.agree` steps of ``comm`` as phases of this operation."""
        comm.phases = self.phases
        return comm

    def returned(self) -> None:
        """``async_save`` returned to its caller: the staging part is over."""
        self.blocked = time.perf_counter() - self.start

    def saved(self, report: SaveReport) -> None:
        self._log(report.tensors, report.nbytes, "wrote", report.bytes_written)

    def loaded(self, requests: Iterable[ReadRequest], bytes_read: int) -> None:
        entries = {r.entry.fqn: r.entry for r in requests}
        self._log(len(entries), sum(e.nbytes for e in entries.values()), "read", bytes_read)

    def _log(self, tensors: int, nbytes: int, verb: str, rank_bytes: int) -> None:
        seconds = time.perf_counter() - self.start
        fields: dict[str, Any] = {
            "op": self.what,
            "path": self.path,
            "tensors": tensors,
            "bytes": nbytes,
            "seconds": seconds,
            "mb_per_s": _rate(nbytes, seconds),
            "rank": self.comm.rank,
            "world_size": self.comm.world_size,
        }
        if self.blocked is not None:
            fields["blocked_seconds"] = self.blocked
        if self.comm.is_coordinator and logger.isEnabledFor(logging.INFO):
            if self.blocked is None:
                logger.info(
                    "%s %r: %d tensors, %d bytes in %.3f s (%.1f MB/s)",
                    self.what,
                    self.path,
                    tensors,
                    nbytes,
                    seconds,
                    fields["mb_per_s"],
                    extra={"zarrckpt": fields},
                )
            else:
                logger.info(
                    "%s %r: %d tensors, %d bytes; blocked %.3f s staging, "
                    "committed after %.3f s (%.1f MB/s)",
                    self.what,
                    self.path,
                    tensors,
                    nbytes,
                    self.blocked,
                    seconds,
                    fields["mb_per_s"],
                    extra={"zarrckpt": fields},
                )
        if logger.isEnabledFor(logging.DEBUG):
            phases = ", ".join(f"{name} {s:.3f} s" for name, s in self.phases.items())
            rank_fields = {**fields, f"bytes_{verb}": rank_bytes, "phases": dict(self.phases)}
            logger.debug(
                "%s %r rank %d/%d: %s %d bytes in %.3f s (%.1f MB/s); phases: %s",
                self.what,
                self.path,
                self.comm.rank,
                self.comm.world_size,
                verb,
                rank_bytes,
                seconds,
                _rate(rank_bytes, seconds),
                phases or "none",
                extra={"zarrckpt": rank_fields},
            )

    def failed(self, error: BaseException) -> None:
        """An async_save failed in the background (its future holds the error)."""
        seconds = time.perf_counter() - self.start
        logger.error(
            "%s %r failed on rank %d after %.3f s: %s: %s",
            self.what,
            self.path,
            self.comm.rank,
            seconds,
            type(error).__name__,
            error,
            extra={
                "zarrckpt": {
                    "op": self.what,
                    "path": self.path,
                    "seconds": seconds,
                    "rank": self.comm.rank,
                    "error": repr(error),
                }
            },
        )
