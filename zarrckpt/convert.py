"""Streaming converters between zarrckpt and ``torch.save`` files, DCP directories
and safetensors files (public module; the implementation is in
:mod:`zarrckpt.interop.convert`). See ``docs/convert.md``."""

from .interop.convert import *  # noqa: F403
from .interop.convert import __all__  # noqa: F401
