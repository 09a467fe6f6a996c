"""What :func:`zarrckpt.load` returns: the keys it skipped on either side."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadResult"]


@dataclass(frozen=True)
class LoadResult:
    """Keys a load did not match, like the result of ``nn.Module.load_state_dict``.

    Attributes
    ----------
    missing_keys : list of str
        Keys (FQNs) of the target that the checkpoint lacks. They kept their
        values; only ``strict=False`` lets a load with missing keys succeed.
    unexpected_keys : list of str
        Keys of the checkpoint that the target did not ask for (never loaded).
    """

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
