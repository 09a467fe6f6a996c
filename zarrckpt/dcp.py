"""``torch.distributed.checkpoint`` storage plug-ins (public module; the
implementation is in :mod:`zarrckpt.interop`)."""

from .interop._dcp import ZarrStorageReader, ZarrStorageWriter

__all__ = ["ZarrStorageWriter", "ZarrStorageReader"]
