"""The checkpoint manager: step checkpoints below one root, retention and resume.

:class:`CheckpointManager` (imported on first use: it imports torch), plus the
torch-free listing of a manager root used by the command line
(:func:`~zarrckpt.manager._steps.scan_steps`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._retention import steps_to_delete

if TYPE_CHECKING:
    from ._manager import CheckpointManager

__all__ = ["CheckpointManager", "steps_to_delete"]


def __getattr__(name: str) -> Any:
    if name == "CheckpointManager":
        from ._manager import CheckpointManager

        return CheckpointManager
    raise AttributeError(f"module 'zarrckpt.manager' has no attribute {name!r}")
