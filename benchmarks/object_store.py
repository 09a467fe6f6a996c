"""Workload (s3): save and load on an S3 server on loopback, with request counts.

``python -m benchmarks.object_store [--quick | --tiny] [--latency-ms MS] [--out DIR]``

Starts moto's S3 server on 127.0.0.1 (its own process) and a counting HTTP proxy in
front of it (moto keeps no request counter one can trust), then saves and
loads the same state dicts, in the same run, with:

* ``zarrckpt``: ``zarrckpt.save`` / ``zarrckpt.load`` (obstore);
* ``zarrckpt (DCP plug-in)``: ``dcp.save`` / ``dcp.load`` with
  ``ZarrStorageWriter`` / ``ZarrStorageReader``;
* ``DCP (fsspec/s3fs)``: ``dcp.save`` / ``dcp.load`` with DCP's
  ``FsspecWriter`` / ``FsspecReader`` on s3fs.

Workloads: ``gpt`` (a GPT-like model state, ~150 MB full, ~30 MB quick) and
``small`` (1,000 tensors of 16 KiB). Every save goes to a fresh prefix. Each
row reports the median time of the repetitions and the HTTP requests the
proxy saw for one checkpoint (by method: PUT, GET, HEAD, POST, DELETE; POSTs
are multipart-upload starts and completions, and batch deletes). Every load is
checked bit-exact against the saved state. All traffic stays on 127.0.0.1;
the proxy's per-request cost applies to every system alike. On loopback a
request costs mostly moto's own Python work (in this process); a real store
over a network costs a round trip per request, which ``--latency-ms`` adds
in the proxy, so that how many requests a system keeps in flight shows.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from . import report
from ._proxy import forward

__all__ = ["SIZES", "SYSTEMS", "CountingProxy", "run", "markdown", "write", "main"]

_KEY, _SECRET, _REGION = "zarrckpt-bench", "zarrckpt-bench-secret", "us-east-1"

#: mode -> (gpt: layers, hidden, vocab; small: number of 16 KiB tensors; repetitions)
SIZES: dict[str, dict[str, Any]] = {
    "full": {"gpt": (6, 512, 16384), "small": 1000, "repeats": 3},
    "quick": {"gpt": (2, 384, 8192), "small": 1000, "repeats": 2},
    "tiny": {"gpt": (1, 64, 256), "small": 40, "repeats": 1},
}


class CountingProxy:
    """An HTTP proxy on 127.0.0.1 forwarding every request to ``target``
    (``host:port``) and counting requests by method."""

    def __init__(self, target: str, latency: float = 0.0) -> None:
        self.target = target
        self.latency = latency
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()  # no Nagle stalls: replies are written in pieces
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.counts[self.command] += 1
                if proxy.latency:
                    time.sleep(proxy.latency)  # the round trip of a store over a network
                forward(self, proxy.target, body, timeout=120)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def take(self) -> dict[str, int]:
        """The counts since the last call (and reset them)."""
        with self.lock:
            out = dict(self.counts)
            self.counts.clear()
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_endpoint(latency: float = 0.0) -> Iterator[CountingProxy]:
    """moto on 127.0.0.1, in a process of its own (its Python work does not hold
    this process's GIL), behind a :class:`CountingProxy` adding ``latency``
    seconds to every request; a bucket ``bench`` exists."""
    import subprocess

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        proxy = CountingProxy(f"127.0.0.1:{port}", latency)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id=_KEY,
            aws_secret_access_key=_SECRET,
            region_name=_REGION,
        ).create_bucket(Bucket="bench")
        yield proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.terminate()
        server.wait(timeout=30)


# ------------------------------------------------------------------ data


def gpt_state(layers: int, hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    """A GPT-like model state (float32): embeddings, per-layer attention and MLP."""
    g = torch.Generator().manual_seed(0)
    sd = {
        "wte": torch.randn(vocab, hidden, generator=g),
        "wpe": torch.randn(1024, hidden, generator=g),
    }
    for i in range(layers):
        p = f"h.{i}."
        sd[p + "ln_1.weight"] = torch.randn(hidden, generator=g)
        sd[p + "attn.c_attn.weight"] = torch.randn(hidden, 3 * hidden, generator=g)
        sd[p + "attn.c_attn.bias"] = torch.randn(3 * hidden, generator=g)
        sd[p + "attn.c_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[p + "ln_2.weight"] = torch.randn(hidden, generator=g)
        sd[p + "mlp.c_fc.weight"] = torch.randn(hidden, 4 * hidden, generator=g)
        sd[p + "mlp.c_proj.weight"] = torch.randn(4 * hidden, hidden, generator=g)
    sd["ln_f.weight"] = torch.randn(hidden, generator=g)
    return sd


def small_state(n: int) -> dict[str, torch.Tensor]:
    """``n`` float32 tensors of 16 KiB each."""
    g = torch.Generator().manual_seed(1)
    return {f"t{i:04d}": torch.randn(4096, generator=g) for i in range(n)}


# ------------------------------------------------------------------ systems


def _obstore_options(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "region": _REGION,
        "access_key_id": _KEY,
        "secret_access_key": _SECRET,
    }


def _s3fs_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": _KEY,
        "secret": _SECRET,
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": _REGION},
        "skip_instance_cache": True,
    }


def _zc_save(sd: dict[str, Any], url: str, endpoint: str) -> None:
    import zarrckpt

    zarrckpt.save(sd, url, storage_options=_obstore_options(endpoint))


def _zc_load(target: dict[str, Any], url: str, endpoint: str) -> None:
    import zarrckpt

    zarrckpt.load(target, url, storage_options=_obstore_options(endpoint))


def _plugin_save(sd: dict[str, Any], url: str, endpoint: str) -> None:
    import torch.distributed.checkpoint as dcp

    from zarrckpt import ZarrStorageWriter

    writer = ZarrStorageWriter(url, storage_options=_obstore_options(endpoint))
    dcp.save(sd, storage_writer=writer)


def _plugin_load(target: dict[str, Any], url: str, endpoint: str) -> None:
    import torch.distributed.checkpoint as dcp

    from zarrckpt import ZarrStorageReader

    reader = ZarrStorageReader(url, storage_options=_obstore_options(endpoint))
    dcp.load(target, storage_reader=reader)


def _fsspec_save(sd: dict[str, Any], url: str, endpoint: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    dcp.save(sd, storage_writer=FsspecWriter(url, **_s3fs_options(endpoint)))


def _fsspec_load(target: dict[str, Any], url: str, endpoint: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    dcp.load(target, storage_reader=FsspecReader(url, **_s3fs_options(endpoint)))


Op = Callable[[dict[str, Any], str, str], None]
#: name -> (label, save, load)
SYSTEMS: dict[str, tuple[str, Op, Op]] = {
    "zarrckpt": ("zarrckpt", _zc_save, _zc_load),
    "zarrckpt-dcp": ("zarrckpt (DCP plug-in)", _plugin_save, _plugin_load),
    "dcp-fsspec": ("DCP (FsspecWriter, s3fs)", _fsspec_save, _fsspec_load),
}


# ------------------------------------------------------------------ running


def _bit_exact(sd: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> bool:
    return all(
        got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8))
        for k, v in sd.items()
    )


def run(mode: str = "quick", latency_ms: float = 0.0) -> dict[str, Any]:
    """Measure every system on every workload; return the results (JSON-able).
    ``latency_ms``: added to every request by the proxy (a remote store's round
    trip; 0: loopback only)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    size = SIZES[mode]
    workloads = {"gpt": gpt_state(*size["gpt"]), "small": small_state(size["small"])}
    rows: list[dict[str, Any]] = []
    with s3_endpoint(latency_ms / 1000) as proxy:
        for wname, sd in workloads.items():
            nbytes = sum(t.numel() * t.element_size() for t in sd.values())
            for sname, (label, save, load) in SYSTEMS.items():
                save_times, load_times = [], []
                save_req: dict[str, int] = {}
                load_req: dict[str, int] = {}
                exact = True
                for _ in range(size["repeats"]):
                    url = f"s3://bench/{wname}-{sname}-{uuid.uuid4().hex[:8]}"
                    proxy.take()
                    t0 = time.perf_counter()
                    save(sd, url, proxy.endpoint)
                    save_times.append(time.perf_counter() - t0)
                    save_req = proxy.take()
                    target = {k: torch.zeros_like(v) for k, v in sd.items()}
                    t0 = time.perf_counter()
                    load(target, url, proxy.endpoint)
                    load_times.append(time.perf_counter() - t0)
                    load_req = proxy.take()
                    exact = exact and _bit_exact(sd, target)
                for op, times, req in (
                    ("save", save_times, save_req),
                    ("load", load_times, load_req),
                ):
                    rows.append(
                        {
                            "workload": wname,
                            "system": sname,
                            "label": label,
                            "op": op,
                            "nbytes": nbytes,
                            "tensors": len(sd),
                            "times_s": times,
                            "median_s": statistics.median(times),
                            "requests": sum(req.values()),
                            "requests_by_method": req,
                            "bit_exact": exact,
                        }
                    )
    return {"mode": mode, "latency_ms": latency_ms, "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        f"## (s3) save/load on a loopback S3 server (moto), mode {results['mode']}, "
        f"{results.get('latency_ms', 0):g} ms added per request",
        "",
        "| workload | system | op | median s | MB/s | requests | by method | bit-exact |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in results["rows"]:
        methods = ", ".join(f"{k} {v}" for k, v in sorted(r["requests_by_method"].items()))
        mbs = r["nbytes"] / 1e6 / r["median_s"] if r["median_s"] > 0 else float("nan")
        wl = f"{r['workload']} ({r['tensors']} tensors, {r['nbytes'] / 1e6:.1f} MB)"
        lines.append(
            f"| {wl} | {r['label']} | {r['op']} | {r['median_s']:.2f} | {mbs:.0f} | "
            f"{r['requests']} | {methods} | {'yes' if r['bit_exact'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out_dir: str) -> list[str]:
    """Write ``object_store.json`` and ``object_store.md`` into ``out_dir``; return the paths."""
    return report.write_json_and_markdown(results, markdown(results), out_dir, "object_store")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.object_store", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller GPT state (~30 MB)")
    parser.add_argument("--tiny", action="store_true", help="seconds; for the test suite")
    parser.add_argument("--out", default=None, help="write object_store.json / .md here")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0,
        help="add this round trip to every request (a store over a network; default 0)",
    )
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    results = run(mode, args.latency_ms)
    if args.out:
        write(results, args.out)
    sys.stdout.write(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
