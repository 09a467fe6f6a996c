"""Streaming converters between zarrckpt and ``torch.save`` files, DCP directories
and safetensors files.

Every converter reads its source one tensor (or one chunk, or one stored
piece) at a time, writes it, and releases it, so a conversion needs about the
largest tensor's memory (often only a chunk's), never the whole checkpoint.
Writing a zarrckpt checkpoint follows the same protocol as
:func:`zarrckpt.save`: a hidden staging directory, crc32c on every chunk, a
commit marker, an atomic publish. Writing a file or a DCP directory goes
through a temporary name that is renamed into place once complete.

See ``docs/convert.md`` for what each format can hold and how the
conversions map what it cannot.

``zarrckpt convert SRC DST`` on the command line converts between any two of
the four formats (through a temporary zarrckpt checkpoint when neither side is
one).
"""

from __future__ import annotations

from ._any import convert, detect_format
from ._builder import ProgressFn
from ._common import FORMATS, ConvertResult
from ._dcp import from_dcp, to_dcp
from ._safetensors import from_safetensors, to_safetensors
from ._torch import from_torch_save, to_torch_save

__all__ = [
    "FORMATS",
    "ConvertResult",
    "ProgressFn",
    "convert",
    "detect_format",
    "from_dcp",
    "from_safetensors",
    "from_torch_save",
    "to_dcp",
    "to_safetensors",
    "to_torch_save",
]
