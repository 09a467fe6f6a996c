"""Forward one HTTP request to a loopback server and copy its response back.

The request-counting proxy of :mod:`benchmarks.object_store` and the
fault-injecting proxy of the object-store tests (``tests/_s3.py``) both sit in
front of the moto S3 server; this is the part they share.
"""

from __future__ import annotations

import http.client
import socket
from http.server import BaseHTTPRequestHandler

__all__ = ["forward"]


def forward(handler: BaseHTTPRequestHandler, target: str, body: bytes, *, timeout: float) -> None:
    """Send ``handler``'s request (method, path, headers, ``body``) to ``target``
    (``host:port``) and write the response back through ``handler``.

    Both connections run without Nagle's algorithm (replies are written in
    pieces; with it every request would stall ~40 ms).
    """
    conn = http.client.HTTPConnection(target, timeout=timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.request(handler.command, handler.path, body=body, headers=dict(handler.headers))
        resp = conn.getresponse()
        data = resp.read()
        handler.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                handler.send_header(k, v)
        length = resp.getheader("Content-Length") if handler.command == "HEAD" else None
        handler.send_header("Content-Length", length or str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
    finally:
        conn.close()
