"""Object-store URLs and ``storage_options``: which client store a URL names.

zarrckpt reaches object stores through obstore (the Rust ``object_store``
crate; zarr-python's ``zarr.storage.ObjectStore`` is built on it): see
docs/object-storage.md for why it was chosen over s3fs. This module parses a
URL (``s3://bucket/prefix``) and the user's
``storage_options`` into an obstore store rooted at the bucket, plus the key
prefix of the checkpoint. Imports obstore only when a store is built, so that
local-only users need not install it (the ``zarrckpt[s3]`` extra).
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any

from ..errors import InvalidPathError

__all__ = [
    "OBJECT_SCHEMES",
    "DEFAULT_RETRY",
    "ObjectPath",
    "build_client",
    "parse_url",
    "retry_settings",
]

#: URL schemes served by :class:`~zarrckpt.storage._object.ObjectStore`
OBJECT_SCHEMES = ("s3", "s3a")
#: the client's retry policy unless storage_options say otherwise (seconds)
DEFAULT_RETRY = {
    "max_retries": 10,
    "retry_timeout": 120.0,
    "retry_init_backoff": 0.1,
    "retry_max_backoff": 15.0,
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$")
#: fsspec / s3fs spellings accepted for obstore's S3 configuration keys
_ALIASES = {
    "endpoint_url": "endpoint",
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
    "region_name": "region",
}
_CLIENT_KEYS = ("allow_http", "timeout", "connect_timeout", "allow_invalid_certificates")


class ObjectPath(str):
    """An object-store URL that carries its ``storage_options`` through the
    layers that pass paths around as strings (``check_path`` returns it;
    :func:`~zarrckpt.storage._local.open_store` reads them back)."""

    storage_options: dict[str, Any] | None

    def __new__(cls, url: str, storage_options: dict[str, Any] | None = None) -> ObjectPath:
        self = super().__new__(cls, url)
        self.storage_options = None if storage_options is None else dict(storage_options)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (ObjectPath, (str(self), self.storage_options))


def parse_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, prefix)`` of an object-store URL (``prefix`` without
    leading or trailing ``/``; the bucket of ``memory://`` URLs is ``""``).

    Raises
    ------
    zarrckpt.errors.InvalidPathError
        Not a URL of a supported scheme, or an S3 URL without bucket.
    """
    m = _URL.match(url)
    if not m or m.group(1).lower() not in OBJECT_SCHEMES:
        raise InvalidPathError(
            f"{url!r} is not an object-store URL zarrckpt supports (schemes: "
            f"{', '.join(s + '://' for s in OBJECT_SCHEMES)}, and file:// for local paths)"
        )
    scheme, rest = m.group(1).lower(), m.group(2)
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidPathError(f"object-store URL {url!r} names no bucket (s3://bucket/prefix)")
    return scheme, bucket, prefix.strip("/")


def _seconds(options: dict[str, Any], name: str) -> timedelta:
    value = options.pop(name, DEFAULT_RETRY[name])
    try:
        return timedelta(seconds=float(value))
    except (TypeError, ValueError):
        raise InvalidPathError(
            f"storage_options[{name!r}] must be a number of seconds, not {value!r}"
        ) from None


def retry_settings(options: dict[str, Any]) -> dict[str, Any]:
    """obstore's ``RetryConfig`` from (and removed from) ``options``: exponential
    backoff with jitter, at most ``max_retries`` retries of one request and
    none after ``retry_timeout`` seconds from its first attempt."""
    max_retries = options.pop("max_retries", DEFAULT_RETRY["max_retries"])
    if not isinstance(max_retries, int) or max_retries < 0:
        raise InvalidPathError(
            f"storage_options['max_retries'] must be an int >= 0, not {max_retries!r}"
        )
    return {
        "max_retries": max_retries,
        "retry_timeout": _seconds(options, "retry_timeout"),
        "backoff": {
            "init_backoff": _seconds(options, "retry_init_backoff"),
            "max_backoff": _seconds(options, "retry_max_backoff"),
            "base": 2,
        },
    }


def _import_obstore() -> Any:
    try:
        import obstore.store
    except ImportError:
        raise InvalidPathError(
            "object-store URLs need the obstore package: pip install 'zarrckpt[s3]'"
        ) from None
    return obstore.store


def build_client(url: str, storage_options: dict[str, Any] | None, *, rooted: bool = False) -> Any:
    """The obstore store of ``url``'s bucket (keys are relative to the bucket;
    with ``rooted``, relative to the URL's prefix: the store zarr-python reads).

    ``storage_options`` are obstore's S3 configuration keys (``endpoint``,
    ``region``, ``access_key_id``, ``secret_access_key``, ``session_token``,
    ``skip_signature``, ...) or their s3fs spellings (``endpoint_url``, ``key``,
    ``secret``, ``token``, ``region_name``, ``anon``), the HTTP client's
    ``allow_http``, ``timeout`` and ``connect_timeout``, and the retry policy
    (``max_retries``, ``retry_timeout``, ``retry_init_backoff``,
    ``retry_max_backoff``, in seconds). Unset keys come from the usual
    ``AWS_*`` environment variables. A plain ``http://`` endpoint is allowed
    without ``allow_http``.

    Raises
    ------
    zarrckpt.errors.InvalidPathError
        An unknown option, or obstore is not installed.
    """
    _scheme, bucket, prefix = parse_url(url)
    store_mod = _import_obstore()
    options = dict(storage_options or {})
    retry = retry_settings(options)
    for alias, name in _ALIASES.items():
        if alias in options:
            options[name] = options.pop(alias)
    for anon in ("anon", "anonymous"):
        if anon in options:
            options["skip_signature"] = bool(options.pop(anon))
    client = {k: options.pop(k) for k in _CLIENT_KEYS if k in options}
    endpoint = (
        options.get("endpoint")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or (os.environ.get("AWS_ENDPOINT_URL"))
    )
    if endpoint and str(endpoint).startswith("http://"):
        client.setdefault("allow_http", True)
    try:
        return store_mod.S3Store(
            bucket,
            prefix=prefix if rooted and prefix else None,
            client_options=client or None,
            retry_config=retry,
            **options,
        )
    except Exception as e:  # obstore raises its own configuration errors
        raise InvalidPathError(
            f"cannot use storage_options {sorted(storage_options or {})} for {url!r}: {e}"
        ) from None
