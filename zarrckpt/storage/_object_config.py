"""Object-store URLs and ``storage_options``: which client store a URL names.

zarrckpt reaches object stores through obstore (the Rust ``object_store``
crate; zarr-python's ``zarr.storage.ObjectStore`` is built on it): see
docs/object-storage.md for why it was chosen over s3fs. This module parses a
URL (``s3://bucket/prefix``, ``az://container/prefix``, ``memory://name/prefix``)
and the user's ``storage_options`` into an obstore store rooted at the bucket
(container), plus the key prefix of the checkpoint. ``gs://`` is refused: no
loopback GCS server on PyPI serves what obstore's GCS client sends
(docs/object-storage.md, "URLs and options"). Imports obstore only when a store is built, so that
local-only users need not install it (the ``zarrckpt[s3]`` extra).
"""

from __future__ import annotations

import os
import re
import threading
from datetime import timedelta
from typing import Any

from ..errors import InvalidPathError

__all__ = [
    "OBJECT_SCHEMES",
    "UNSUPPORTED_SCHEMES",
    "DEFAULT_RETRY",
    "ObjectPath",
    "build_client",
    "check_world_size",
    "parse_url",
    "retry_settings",
]

#: URL schemes served by :class:`~zarrckpt.storage._object.ObjectStore`
OBJECT_SCHEMES = ("s3", "s3a", "az", "azure", "abfs", "abfss", "memory")
_AZURE_SCHEMES = ("az", "azure", "abfs", "abfss")
#: object-store schemes zarrckpt knows but refuses, and why
UNSUPPORTED_SCHEMES = {
    scheme: (
        "Google Cloud Storage (gs://) is not supported yet: there is no loopback GCS "
        "server on PyPI that accepts obstore's GCS uploads, so it cannot be tested "
        "(docs/object-storage.md, 'URLs and options'); supported object-store URLs: "
        "s3://, az://, memory://"
    )
    for scheme in ("gs", "gcs")
}
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
    leading or trailing ``/``). The bucket of a ``memory://`` URL is ``""``:
    the whole path is the prefix in the process's one in-memory store.

    Raises
    ------
    zarrckpt.errors.InvalidPathError
        Not a URL of a supported scheme, a URL without bucket (container), a
        ``memory://`` URL without path, or a key with empty, ``.`` or ``..``
        components (object stores take them literally; a path would not).
    """
    m = _URL.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme in UNSUPPORTED_SCHEMES:
        raise InvalidPathError(f"{url!r}: {UNSUPPORTED_SCHEMES[scheme]}")
    if not m or scheme not in OBJECT_SCHEMES:
        raise InvalidPathError(
            f"{url!r} is not an object-store URL zarrckpt supports (schemes: "
            f"{', '.join(s + '://' for s in OBJECT_SCHEMES)}, and file:// for local paths)"
        )
    rest = m.group(2)
    if scheme == "memory":
        if not rest.strip("/"):
            raise InvalidPathError(
                f"memory URL {url!r} names no path (memory://name/prefix): a save would "
                "delete everything in the process's in-memory store"
            )
        return scheme, "", _checked_key(url, rest.strip("/"))
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        example = "az://container/prefix" if scheme in _AZURE_SCHEMES else "s3://bucket/prefix"
        raise InvalidPathError(f"object-store URL {url!r} names no bucket ({example})")
    return scheme, bucket, _checked_key(url, prefix.strip("/"))


def _checked_key(url: str, key: str) -> str:
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidPathError(
            f"object-store URL {url!r}: its key {key!r} has an empty, '.' or '..' component "
            "(an object store takes it literally, not as a path); write it without"
        )
    return key


def check_world_size(path: str, world_size: int, what: str) -> None:
    """Refuse a ``memory://`` URL for a ``what`` (save, load) of more than one
    process: each process has its own in-memory store, so the ranks would not
    see one checkpoint. Every rank raises the same error (no collective needed).

    Raises
    ------
    zarrckpt.errors.InvalidPathError
        ``path`` is a ``memory://`` URL and ``world_size > 1``.
    """
    scheme, sep, _rest = os.fspath(path).partition("://")
    if sep and scheme.lower() == "memory" and world_size > 1:
        raise InvalidPathError(
            f"{what} of {path!r} by {world_size} processes: a memory:// store lives in one "
            "process (each rank would have its own), so it serves single-process saves and "
            "loads only; use a shared object store (s3://, az://) or a shared filesystem"
        )


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
    with ``rooted``, relative to the URL's prefix: the store zarr-python reads;
    ``memory://`` stores cannot be rooted, see
    :func:`~zarrckpt.storage._object_zarr.zarr_object_store`).

    ``storage_options`` per scheme (docs/object-storage.md, "URLs and options"):

    - ``s3://``: obstore's S3 configuration keys (``endpoint``, ``region``,
      ``access_key_id``, ``secret_access_key``, ``session_token``,
      ``skip_signature``, ...) or their s3fs spellings (``endpoint_url``,
      ``key``, ``secret``, ``token``, ``region_name``, ``anon``); unset keys
      come from the ``AWS_*`` environment variables.
    - ``az://`` (``azure://``, ``abfs[s]://``): obstore's Azure keys
      (``account_name``, ``account_key`` / ``access_key``, ``sas_key``,
      ``token``, ``endpoint``, ``use_emulator``, ...), adlfs's
      ``connection_string`` and ``sas_token``, ``anon``; unset keys come from
      the ``AZURE_STORAGE_*`` environment variables (also
      ``AZURE_STORAGE_CONNECTION_STRING``).
    - ``memory://``: none but the retry policy (one in-memory store per process).

    Every scheme takes the HTTP client's ``allow_http``, ``timeout`` and
    ``connect_timeout``, and the retry policy (``max_retries``,
    ``retry_timeout``, ``retry_init_backoff``, ``retry_max_backoff``, in
    seconds). A plain ``http://`` endpoint is allowed without ``allow_http``.

    Raises
    ------
    zarrckpt.errors.InvalidPathError
        An unknown option, or obstore is not installed.
    """
    scheme, bucket, prefix = parse_url(url)
    store_mod = _import_obstore()
    options = dict(storage_options or {})
    retry = retry_settings(options)
    if scheme == "memory":
        if options:
            raise InvalidPathError(
                f"cannot use storage_options {sorted(options)} for {url!r}: a memory:// store "
                "takes none (only the retry policy)"
            )
        if rooted:
            raise InvalidPathError(
                f"{url!r}: a memory:// store cannot be rooted at a prefix (zarr views "
                "wrap it: zarrckpt.storage._object_zarr.zarr_object_store)"
            )
        return _memory_store(store_mod)
    for anon in ("anon", "anonymous"):
        if anon in options:
            options["skip_signature"] = bool(options.pop(anon))
    client = {k: options.pop(k) for k in _CLIENT_KEYS if k in options}
    if scheme in _AZURE_SCHEMES:
        cls, endpoint = store_mod.AzureStore, _azure_options(bucket, options)
        bucket = bucket.partition("@")[0]
    else:
        cls, endpoint = store_mod.S3Store, _s3_options(options)
    if endpoint and str(endpoint).startswith("http://"):
        client.setdefault("allow_http", True)
    try:
        return cls(
            bucket,
            prefix=prefix if rooted and prefix else None,
            client_options=client or None,
            retry_config=retry,
            **options,
        )
    except Exception as e:  # obstore raises its own configuration errors
        first = str(e).split("\n", 1)[0]
        raise InvalidPathError(
            f"cannot use storage_options {sorted(storage_options or {})} for {url!r}: {first}"
        ) from None


def _s3_options(options: dict[str, Any]) -> Any:
    """s3fs spellings to obstore's (in place); the endpoint in effect."""
    for alias, name in _ALIASES.items():
        if alias in options:
            options[name] = options.pop(alias)
    return (
        options.get("endpoint")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def _azure_options(bucket: str, options: dict[str, Any]) -> Any:
    """adlfs spellings and connection strings to obstore's Azure keys (in place);
    the endpoint in effect. ``container@account.host`` names the account."""
    if "sas_token" in options:
        options["sas_key"] = options.pop("sas_token")
    _container, at, host = bucket.partition("@")
    url_account = host.split(".", 1)[0] if at and host else None
    if url_account is not None:
        given = options.get("account_name")
        if given is not None and given != url_account:
            raise InvalidPathError(
                f"the URL names storage account {url_account!r} ({bucket!r}) but "
                f"storage_options name account {given!r}"
            )
        options["account_name"] = url_account
    conn = options.pop("connection_string", None)
    from_env = conn is None
    # options naming the account or endpoint themselves (the URL's account aside)
    # leave the environment's connection string unused
    explicit = {"endpoint"} if url_account is not None else {"account_name", "endpoint"}
    if from_env and not explicit & options.keys():
        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if conn:
        fields = parse_connection_string(str(conn))
        other = fields.get("account_name") or _endpoint_account(fields.get("endpoint"))
        if url_account is not None and other is not None and other != url_account:
            if not from_env:
                raise InvalidPathError(
                    f"the URL names storage account {url_account!r} ({bucket!r}) but the "
                    f"connection string is for account {other!r}"
                )
            fields = {}  # the environment's string is for another account: not used
        for name, value in fields.items():
            options.setdefault(name, value)
    return (
        options.get("endpoint")
        or os.environ.get("AZURE_STORAGE_ENDPOINT")
        or os.environ.get("AZURE_ENDPOINT")
    )


def _endpoint_account(endpoint: str | None) -> str | None:
    """The storage account a blob endpoint serves: the first label of its host
    (``https://acct.blob.core.windows.net``), or the first path component of an
    emulator's (``http://127.0.0.1:10000/devstoreaccount1``)."""
    if not endpoint:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if host and not host.replace(".", "").isdigit() and host != "localhost":
        return host.split(".", 1)[0]
    path = parts.path.strip("/")
    return path.split("/", 1)[0] or None


#: connection-string fields and the obstore Azure keys they set
_CONNECTION_FIELDS = {
    "accountname": "account_name",
    "accountkey": "account_key",
    "blobendpoint": "endpoint",
    "sharedaccesssignature": "sas_key",
}


def parse_connection_string(conn: str) -> dict[str, str]:
    """obstore Azure keys from an Azure storage connection string
    (``AccountName=...;AccountKey=...;BlobEndpoint=...``; other fields ignored).

    Raises
    ------
    zarrckpt.errors.InvalidPathError
        A field is not ``name=value``.
    """
    out: dict[str, str] = {}
    for part in conn.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise InvalidPathError(
                f"the Azure connection string has a field {name.strip()!r} without '=' "
                "(expected AccountName=...;AccountKey=...;BlobEndpoint=...)"
            )
        key = _CONNECTION_FIELDS.get(name.strip().lower())
        if key:
            out[key] = value.strip()
    return out


#: the process's in-memory store (memory:// URLs), created on first use
_MEMORY: list[Any] = []
_MEMORY_LOCK = threading.Lock()


def _memory_store(store_mod: Any) -> Any:
    """The one obstore ``MemoryStore`` of this process (shared by every call, like
    fsspec's memory filesystem)."""
    with _MEMORY_LOCK:
        if not _MEMORY:
            _MEMORY.append(store_mod.MemoryStore())
        return _MEMORY[0]
