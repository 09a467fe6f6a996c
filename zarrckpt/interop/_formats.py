"""The format names of the converters, in a module of their own: the command
line (:mod:`zarrckpt.cli.convert`) needs them to build its parser without
importing torch or the converters."""

from __future__ import annotations

__all__ = ["FORMATS"]

#: format names accepted by :func:`zarrckpt.convert.convert` and ``zarrckpt convert --from/--to``
FORMATS = ("torch", "dcp", "safetensors", "zarrckpt")
