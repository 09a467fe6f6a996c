"""Give back the resident pages of a memory-mapped source file once they are converted.

A converter streams a checkpoint file through a memory map: every page it
touches becomes resident (and counts in the process's RSS) until the mapping
is dropped. Releasing each range with ``madvise(MADV_DONTNEED)`` as soon as its
bytes are written keeps the resident set near one chunk.

Only ranges that lie inside a *file-backed* mapping of the source file (as
listed by ``/proc/self/maps``) are ever released: a clean page of a file
mapping is simply read again from the file if touched later, whereas
``MADV_DONTNEED`` on anonymous memory would zero it. Where ``/proc/self/maps``
or ``madvise`` is not available (not Linux), nothing is released and memory
is reclaimed by the OS as usual.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

from ..storage._files import file_identity, read_text

__all__ = ["FileMappings", "PAGE_SIZE"]

PAGE_SIZE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def _libc_madvise() -> object | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        func = ctypes.CDLL(name, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    func.restype = ctypes.c_int
    return func


_MADVISE = _libc_madvise()


class FileMappings:
    """The address ranges at which this process maps the file ``path``.

    Parameters
    ----------
    path
        A file that the caller has just memory-mapped (e.g. with
        ``torch.load(mmap=True)``).
    """

    def __init__(self, path: str) -> None:
        #: (start, end, file offset) of each mapping of the file
        self.ranges: list[tuple[int, int, int]] = []
        try:
            major, minor, ino = file_identity(path)
            lines = read_text("/proc/self/maps").splitlines(keepends=True)
        except OSError:
            return
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 5:
                continue
            try:
                start_s, end_s = parts[0].split("-")
                dev_major, dev_minor = (int(x, 16) for x in parts[3].split(":"))
                inode = int(parts[4])
                offset = int(parts[2], 16)
            except ValueError:
                continue
            if inode == ino and (dev_major, dev_minor) == (major, minor):
                self.ranges.append((int(start_s, 16), int(end_s, 16), offset))

    def file_offset(self, address: int) -> int | None:
        """Offset in the file of the byte mapped at ``address`` (None: not in the file)."""
        for start, end, offset in self.ranges:
            if start <= address < end:
                return offset + address - start
        return None

    def release(self, address: int, nbytes: int) -> None:
        """Drop the whole pages inside ``[address, address + nbytes)`` from the resident set."""
        if _MADVISE is None or nbytes <= 0:
            return
        lo = -(-address // PAGE_SIZE) * PAGE_SIZE
        hi = (address + nbytes) // PAGE_SIZE * PAGE_SIZE
        if hi <= lo:
            return
        for start, end, _ in self.ranges:
            if start <= lo and hi <= end:
                _MADVISE(ctypes.c_void_p(lo), hi - lo, _MADV_DONTNEED)  # type: ignore[operator]
                return
