"""Exceptions raised by zarrckpt.

Every exception derives from :class:`ZarrCkptError` and, where one fits, from
the built-in exception it refines, so ``except FileNotFoundError`` or
``except KeyError`` keep working for callers that do not know zarrckpt.
Messages name the key (FQN), the checkpoint path and what was expected.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ZarrCkptError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "StateDictMismatchError",
    "MissingKeysError",
    "ShapeMismatchError",
    "UnsafeCheckpointError",
    "InvalidKeyError",
    "UnsupportedValueError",
    "DistributedSaveError",
    "InvalidPathError",
    "StorageError",
    "ObjectStoreError",
    "InvalidArgumentError",
]


class ZarrCkptError(Exception):
    """Base class of every error raised by zarrckpt."""


class CheckpointNotFoundError(ZarrCkptError, FileNotFoundError):
    """No checkpoint (committed or not) exists at the given path."""


class CheckpointExistsError(ZarrCkptError, FileExistsError):
    """A checkpoint already exists at the path and ``overwrite=False``."""


class IncompleteCheckpointError(ZarrCkptError, FileNotFoundError):
    """The path holds a checkpoint whose commit marker is missing or does not match.

    Such a checkpoint was never committed (its save died or is still running)
    and is never loaded.
    """


class CorruptCheckpointError(ZarrCkptError, ValueError):
    """Stored bytes are damaged: checksum mismatch, missing or truncated chunk,
    unreadable metadata."""


class StateDictMismatchError(ZarrCkptError, ValueError):
    """The target state dict does not match the checkpoint."""


class MissingKeysError(StateDictMismatchError, KeyError):
    """Keys of the target state dict are absent from the checkpoint.

    Attributes
    ----------
    missing : list of str
        The missing fully qualified names.
    """

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes despite __init__
        return (type(self), (self.args[0], self.missing))


class ShapeMismatchError(StateDictMismatchError):
    """A target tensor's shape differs from the stored global shape."""


class UnsafeCheckpointError(ZarrCkptError, ValueError):
    """Pickle would be needed (to save an object, or to load one) and
    ``allow_pickle`` is not set."""


class InvalidKeyError(ZarrCkptError, ValueError):
    """A state-dict key cannot be stored (empty, duplicate after flattening, ...)."""


class UnsupportedValueError(ZarrCkptError, TypeError):
    """A state-dict leaf has a type or dtype zarrckpt cannot store."""


class DistributedSaveError(ZarrCkptError, RuntimeError):
    """A collective save or load failed on at least one rank.

    Every rank raises it, so no rank hangs waiting for the others.
    """


class InvalidPathError(ZarrCkptError, ValueError):
    """A path zarrckpt cannot use: empty, an object-store URL of an unsupported
    scheme, unknown ``storage_options``, or ``storage_options`` given for a local path."""


class StorageError(ZarrCkptError, OSError):
    """Reading or writing a checkpoint's storage failed: no space left, an I/O
    error, permission denied, a read-only filesystem, ...

    ``errno`` is the failed operation's; the message says what was being done
    (the checkpoint path, and for a read the key and chunk) and names the file.
    A failed save leaves the previous checkpoint at its path as it was.
    """

    @classmethod
    def wrap(cls, error: OSError, doing: str) -> ZarrCkptError:
        """The error for ``error`` raised while ``doing`` (``error`` itself if it is a
        zarrckpt error already)."""
        if isinstance(error, ZarrCkptError):
            return error
        reason = error.strerror or str(error) or type(error).__name__
        named = not error.filename or str(error.filename) in doing
        where = "" if named else f" (file {error.filename!r})"
        return cls(error.errno, f"{doing} failed: {reason}{where}")


class ObjectStoreError(StorageError):
    """An object-store request failed: the server kept failing (5xx, throttling,
    timeouts, dropped connections) until the retry bound ran out, or it refused
    the request (4xx: credentials, permissions, a missing bucket). The message
    names the key, the location and the request."""


class InvalidArgumentError(ZarrCkptError, ValueError):
    """An argument value zarrckpt cannot use (a retention count below 1, a negative
    step, ...); the message names the argument and what is expected."""
