"""Which committed steps a checkpoint manager keeps: a pure function of the step list."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["steps_to_delete"]


def _rank_value(value: Any, mode: str) -> float | None:
    """The metric as a float ordered so that smaller is better (None: not rankable)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    if math.isnan(number):
        return None
    return number if mode == "min" else -number


def steps_to_delete(
    committed: Sequence[int],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    keep_best: int | None = None,
    metric_values: Mapping[int, Any] | None = None,
    best_mode: Literal["min", "max"] = "min",
) -> list[int]:
    """The committed steps that retention deletes (ascending).

    A step is kept when any rule keeps it: it is the newest step (always); it
    is one of the ``keep_last`` newest; it is divisible by ``keep_every``; or
    its metric is among the ``keep_best`` best (smallest with ``best_mode="min"``,
    largest with ``"max"``; ties go to the newer step; a step without the metric,
    or with NaN, is never among the best). With both ``keep_last`` and
    ``keep_best`` None nothing is deleted.

    Parameters
    ----------
    committed
        The committed steps (any order, no duplicates).
    keep_last, keep_every, keep_best
        The rules (None: the rule is off).
    metric_values
        The best-by metric of each step (steps may be missing).
    best_mode
        ``"min"`` or ``"max"``.
    """
    if keep_last is None and keep_best is None:
        return []
    steps = sorted(committed)
    if not steps:
        return []
    kept = {steps[-1]}
    if keep_last is not None and keep_last > 0:
        kept.update(steps[-keep_last:])
    if keep_every is not None:
        kept.update(s for s in steps if s % keep_every == 0)
    if keep_best is not None and keep_best > 0:
        values = metric_values or {}
        ranked = [
            (v, -s) for s in steps if (v := _rank_value(values.get(s), best_mode)) is not None
        ]
        kept.update(-neg for _v, neg in sorted(ranked)[:keep_best])
    return [s for s in steps if s not in kept]
