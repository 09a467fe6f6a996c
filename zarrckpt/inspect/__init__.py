"""Read-only, single-process access to a checkpoint: ``zarrckpt.open``
(see :mod:`zarrckpt.inspect._checkpoint`)."""

from ._checkpoint import *  # noqa: F403
from ._checkpoint import __all__ as _all
from ._verify import PROBLEM_KINDS

__all__ = [*_all, "PROBLEM_KINDS"]
