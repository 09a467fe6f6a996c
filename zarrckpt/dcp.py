"""``torch.distributed.checkpoint`` storage plug-ins (public module; the
implementation is in :mod:`zarrckpt.interop.dcp`)."""

from .interop.dcp._reader import ZarrStorageReader
from .interop.dcp._writer import ZarrStorageWriter

__all__ = ["ZarrStorageWriter", "ZarrStorageReader"]
