"""Streaming converters between zarrckpt and ``torch.save`` files, DCP directories
and safetensors files (public module; the implementation is in
:mod:`zarrckpt.interop`). See ``docs/convert.md``."""

from .interop._convert import *  # noqa: F403
from .interop._convert import __all__  # noqa: F401
