"""Owner records of staging directories: which stagings belong to a dead save.

A save that dies (SIGKILL, power loss, an out-of-memory kill) leaves its
staging directory ``.<name>.zarrckpt-tmp-<id>`` beside the checkpoint path. The
next save to that path removes it, but it must never remove the staging of a
save that is still running (another job saving to the same path with
``overwrite=True``). So the process that creates a staging also creates its
owner record, the file ``<staging>.owner`` beside it, and until the save is
published or aborted:

* holds an exclusive ``flock`` on the record (released by the kernel when the
  process dies, on whichever host; on a shared filesystem without working
  locks it is merely not seen);
* keeps in it ``{"host", "pid", "start"}`` (``start``: the process start time
  from ``/proc/<pid>/stat``, so a reused pid is not mistaken for the owner);
* refreshes the record's mtime every :data:`HEARTBEAT_SECONDS` (a heartbeat
  for owners on other hosts).

A staging is *stale* (its owner is provably dead) when its record is not
locked and either the owner ran on this host and that process is gone (no such
pid, or a pid with another start time), or it ran on another host and its
heartbeat is older than :data:`STALE_SECONDS`. A staging without a record (one
written by zarrckpt before owner records existed) is stale once its directory
is older than :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from . import _posix

__all__ = [
    "OWNER_SUFFIX",
    "HEARTBEAT_SECONDS",
    "STALE_SECONDS",
    "Owner",
    "claim",
    "release",
    "is_stale",
    "stale_stagings",
    "remove_stale",
]

#: the owner record of staging ``d`` is the file ``d + OWNER_SUFFIX``
OWNER_SUFFIX = ".owner"
#: how often a live owner refreshes its record's mtime
HEARTBEAT_SECONDS = 60.0
#: age after which a record from another host (or a staging without record) is stale
STALE_SECONDS = 30 * 60.0
#: a record still empty this long after its creation belongs to a dead creator
_EMPTY_GRACE_SECONDS = 60.0


def _start_time(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot; None: unknown here)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def _running(pid: int, start: str | None) -> bool:
    """True when process ``pid`` of this host exists and (if known) started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if start is None:
        return True
    now = _start_time(pid)
    return now is None or now == start


@dataclass
class Owner:
    """This process's hold on one staging's owner record."""

    record: str
    fd: int
    _stop: threading.Event = field(default_factory=threading.Event)

    def beat(self) -> None:
        """Refresh the record's mtime every :data:`HEARTBEAT_SECONDS` until released."""
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.fd)

    def close(self) -> None:
        """Remove the record, then release the lock (idempotent)."""
        self._stop.set()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record)
        with contextlib.suppress(OSError):
            os.close(self.fd)


_OWNED: dict[str, Owner] = {}
_OWNED_LOCK = threading.Lock()


def claim(staging: str) -> None:
    """Create, lock and fill the owner record of ``staging`` (before the directory
    is created), and start its heartbeat; :func:`release` ends it."""
    record = staging + OWNER_SUFFIX
    fd = os.open(record, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with contextlib.suppress(OSError):  # no locks here: the record still tells
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pid = os.getpid()
        doc = {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}
        os.write(fd, json.dumps(doc).encode())
    except BaseException:
        os.close(fd)
        os.unlink(record)
        raise
    owner = Owner(record, fd)
    threading.Thread(target=owner.beat, name="zarrckpt-heartbeat", daemon=True).start()
    with _OWNED_LOCK:
        _OWNED[staging] = owner


def release(staging: str) -> None:
    """End this process's ownership of ``staging`` (no-op if it has none)."""
    with _OWNED_LOCK:
        owner = _OWNED.pop(staging, None)
    if owner is not None:
        owner.close()


def _locked_by_other(fd: int) -> bool:
    """True when another open file description holds the lock on ``fd``'s file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no locks on this filesystem: decide by the record
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def is_stale(staging: str, *, now: float | None = None) -> bool:
    """True when the save that owns the staging ``staging`` is provably dead."""
    with _OWNED_LOCK:
        if staging in _OWNED:
            return False
    now = time.time() if now is None else now
    record = staging + OWNER_SUFFIX
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:  # a staging of an older zarrckpt: only its age tells
        try:
            return now - os.lstat(staging).st_mtime > STALE_SECONDS
        except FileNotFoundError:
            return False  # gone meanwhile
    try:
        if _locked_by_other(fd):
            return False
        st = os.fstat(fd)
        raw = _posix.read_fd(fd)
    finally:
        os.close(fd)
    age = now - st.st_mtime
    try:
        doc = json.loads(raw)
        host, pid, start = str(doc["host"]), int(doc["pid"]), doc.get("start")
    except (ValueError, TypeError, KeyError):  # being written, or its writer died
        return age > _EMPTY_GRACE_SECONDS
    if host != socket.gethostname():
        return age > STALE_SECONDS
    return not _running(pid, None if start is None else str(start))


def stale_stagings(parent: str, prefix: str) -> list[str]:
    """Paths of the stale stagings (and orphaned owner records) in ``parent`` whose
    names start with ``prefix``, sorted."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        if not name.startswith(prefix):
            continue
        path = os.path.join(parent, name)
        if name.endswith(OWNER_SUFFIX):
            staging = path[: -len(OWNER_SUFFIX)]
            # a record whose staging was published or removed before the record was
            if not os.path.lexists(staging) and is_stale(staging):
                found.append(path)
        elif is_stale(path):
            found.append(path)
    return found


def remove_stale(paths: list[str]) -> None:
    """Remove stale stagings with their owner records, as far as possible (gone
    meanwhile is fine; one that cannot be removed stays, and the save goes on)."""
    for path in paths:
        with contextlib.suppress(OSError):
            _posix.remove_tree(path)
        if not path.endswith(OWNER_SUFFIX) and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.unlink(path + OWNER_SUFFIX)
