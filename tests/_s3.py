"""A real S3 server on loopback for the object-store tests (moto's ThreadedMotoServer),
and a fault-injecting HTTP proxy in front of it.

Nothing here contacts any address but 127.0.0.1: the server binds to it, the
client's endpoint names it, and the instance-metadata lookup is disabled.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from benchmarks._proxy import forward

ACCESS_KEY = "zarrckpt-test"
SECRET_KEY = "zarrckpt-test-secret"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto S3 server and the environment that points clients at it."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a client (subprocesses, the CLI, plain zarr)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def options(self, **extra: Any) -> dict[str, Any]:
        """``storage_options`` for this server (no environment needed)."""
        options = {
            "endpoint": self.endpoint,
            "region": REGION,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "max_retries": 2,
            "retry_timeout": 10,
        }
        options.update(extra)
        return options

    def new_bucket(self) -> str:
        """Create a fresh bucket; return its name."""
        import boto3

        name = f"zc-{uuid.uuid4().hex[:16]}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        client.create_bucket(Bucket=name)
        return name


@contextmanager
def moto_server() -> Iterator[S3Server]:
    """Start moto's S3 server on 127.0.0.1 (a free port) for the duration."""
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 forwarding to ``target`` (``host:port``) that
    fails the first requests it sees: ``fail(n, mode)`` makes the next ``n``
    requests answer 503 SlowDown (``mode="503"``), 500 (``"500"``), 403
    (``"403"``), or close the connection without answering (``"reset"``).
    ``requests`` counts every request, ``faults`` the failed ones; ``log`` lists
    ``(method, path)`` of every request, ``max_in_flight`` the most requests it
    was serving at once, and ``delay`` (seconds) holds each forwarded request
    that long, as a network round trip would."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.pending = 0
        self.mode = "503"
        self.requests = 0
        self.faults = 0
        self.log: list[tuple[str, str]] = []
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.requests += 1
                    proxy.log.append((self.command, self.path.partition("?")[0]))
                    fault = proxy.mode if proxy.pending > 0 else None
                    if fault:
                        proxy.pending -= 1
                        proxy.faults += 1
                if fault == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault:
                    status = int(fault)
                    code = {503: "SlowDown", 500: "InternalError", 403: "AccessDenied"}[status]
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload.encode())
                    return
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    if proxy.delay:
                        time.sleep(proxy.delay)
                    forward(self, proxy.target, body, timeout=30)
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def reset_counts(self) -> None:
        """Forget the requests seen so far (``log``, ``requests``, ``max_in_flight``)."""
        with self.lock:
            self.log.clear()
            self.requests = self.max_in_flight = 0

    def fail(self, n: int, mode: str = "503") -> None:
        with self.lock:
            self.pending, self.mode = n, mode

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
