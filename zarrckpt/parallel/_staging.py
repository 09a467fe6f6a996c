"""Host staging buffers for ``async_save``, reused across calls.

A save stages every tensor piece into a host buffer taken from a pool keyed by
shape and dtype; the buffers go back to the pool when that save finishes, so a
training loop that checkpoints periodically allocates (and, for accelerator
tensors, pins) its staging memory once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["HostStager", "Lease"]

_Key = tuple[tuple[int, ...], torch.dtype, bool]


@dataclass
class Lease:
    """Buffers held by one staged save, and what was built from them."""

    stager: HostStager
    buffers: list[tuple[_Key, torch.Tensor]] = field(default_factory=list)
    state: Any = None

    def release(self) -> None:
        """Give the buffers back to the pool (call once the save is finished)."""
        self.stager._give_back(self.buffers)
        self.buffers = []


class HostStager:
    """Pool of reusable host buffers."""

    def __init__(self) -> None:
        self._free: dict[_Key, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _take(self, key: _Key) -> torch.Tensor | None:
        with self._lock:
            free = self._free.get(key)
            return free.pop() if free else None

    def _give_back(self, buffers: list[tuple[_Key, torch.Tensor]]) -> None:
        with self._lock:
            for key, buf in buffers:
                self._free.setdefault(key, []).append(buf)

    def stage(self, build: Callable[[Callable[[torch.Tensor], torch.Tensor]], Any]) -> Lease:
        """Run ``build(copy)``, where ``copy(tensor)`` returns a host copy in a pooled buffer."""
        lease = Lease(self)
        asynchronous = False

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal asynchronous
            t = tensor.detach()
            if t.is_conj():
                t = t.resolve_conj()
            if t.is_neg():
                t = t.resolve_neg()
            pinned = t.device.type != "cpu" and torch.accelerator.is_available()
            key: _Key = (tuple(t.shape), t.dtype, pinned)
            buf = self._take(key)
            if buf is None:
                buf = torch.empty(key[0], dtype=t.dtype, pin_memory=pinned)
            buf.copy_(t, non_blocking=pinned)
            asynchronous |= pinned
            lease.buffers.append((key, buf))
            return buf

        try:
            lease.state = build(copy)
            if asynchronous:
                torch.accelerator.synchronize()
        except BaseException:
            lease.release()
            raise
        return lease
