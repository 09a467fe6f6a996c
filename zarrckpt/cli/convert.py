"""The ``zarrckpt convert SRC DST`` command: formats inferred from the paths, a progress bar.

Registered with :func:`zarrckpt.cli.command` when this module is imported (it
is listed in ``zarrckpt.cli.PLUGIN_MODULES``, which the parser imports).
Registering imports neither torch nor the converters (the format names come
from the light :mod:`zarrckpt.interop._formats`): the converters are imported
when the command runs, so ``zarrckpt --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError
from ..format._layout import DEFAULT_CHUNK_BYTES
from ..interop._formats import FORMATS

if TYPE_CHECKING:
    from ..interop.convert import ProgressFn

__all__ = ["FORMATS", "register_command", "progress_bar"]



def register_command() -> None:
    """Register ``zarrckpt convert`` with :mod:`zarrckpt.cli`."""
    from . import Arg, command

    @command(
        "convert",
        "convert between torch.save, DCP, safetensors and zarrckpt (streaming, any pair)",
        Arg("src", metavar="SRC", help="source: a .pt/.pth/.bin file, a .safetensors file, "
            "a DCP directory or a zarrckpt checkpoint (local, or an s3:// or az:// URL)"),
        Arg("dst", metavar="DST", help="destination (format from its name; a directory is "
            "zarrckpt, or DCP when SRC is zarrckpt)"),
        Arg("--from", dest="src_format", choices=FORMATS, default=None,
            help="source format (default: detected)"),
        Arg("--to", dest="dst_format", choices=FORMATS, default=None,
            help="destination format (default: from DST)"),
        Arg("--overwrite", action="store_true", help="replace DST if it exists (atomically)"),
        Arg("--allow-pickle", action="store_true",
            help="allow pickled objects (only for files you trust)"),
        Arg("--no-fsync", action="store_true", help="do not fsync the result"),
        Arg("--chunk-bytes", type=int, default=None, metavar="N",
            help=f"target chunk size when writing zarrckpt (default {DEFAULT_CHUNK_BYTES})"),
        Arg("--threads", type=int, default=None, metavar="N", help="I/O threads"),
        Arg("--storage-options", default=None, metavar="JSON",
            help="client options (a JSON object) for the side(s) that are object-store URLs, "
            'e.g. \'{"endpoint": "http://127.0.0.1:9000", "region": "us-east-1"}\' '
            "(default: from the AWS_* / AZURE_STORAGE_* environment variables)"),
    )
    def _convert_command(args: argparse.Namespace, out: Any) -> int:
        from ..interop.convert import convert, detect_format
        from ..storage._local import is_object_url
        from . import UsageError, fmt_bytes

        if args.threads is not None and args.threads < 1:
            raise UsageError("--threads must be >= 1")
        if args.chunk_bytes is not None and args.chunk_bytes < 1:
            raise UsageError("--chunk-bytes must be >= 1")
        storage_options = None
        if args.storage_options is not None:
            import json

            try:
                storage_options = json.loads(args.storage_options)
            except ValueError as e:
                raise UsageError(f"--storage-options is not valid JSON: {e}") from None
            if not isinstance(storage_options, dict):
                raise UsageError("--storage-options must be a JSON object ({...})")
        src_options = storage_options if is_object_url(args.src) else None
        dst_options = storage_options if is_object_url(args.dst) else None
        try:
            sf = args.src_format or detect_format(args.src, storage_options=src_options)
            df = args.dst_format or detect_format(
                args.dst, role="destination", src_format=sf, storage_options=dst_options
            )
        except CheckpointNotFoundError as e:
            raise UsageError(str(e)) from None
        if sf == df:
            raise UsageError(
                f"source and destination are both {sf}; pass --to with another format"
            )
        options: dict[str, Any] = {"overwrite": args.overwrite, "fsync": not args.no_fsync}
        if args.threads is not None:
            options["threads"] = args.threads
        if args.allow_pickle:
            if "safetensors" in (sf, df) and "zarrckpt" in (sf, df):
                raise UsageError("--allow-pickle does not apply to safetensors <-> zarrckpt")
            options["allow_pickle"] = True
        if storage_options is not None:
            options["storage_options"] = storage_options
        if args.chunk_bytes is not None:
            if sf == "zarrckpt":
                raise UsageError("--chunk-bytes applies when writing zarrckpt (or via it)")
            options["chunk_bytes"] = args.chunk_bytes
        with progress_bar(out, f"{sf} -> {df}", enabled=not args.plain) as progress:
            result = convert(
                args.src, args.dst, src_format=sf, dst_format=df, progress=progress, **options
            )
        out.done(
            f"converted {args.src} ({sf}) -> {args.dst} ({df}): {result.tensors} tensors, "
            f"{fmt_bytes(result.nbytes)}",
            {
                "src": result.src,
                "dst": result.dst,
                "src_format": result.src_format,
                "dst_format": result.dst_format,
                "tensors": result.tensors,
                "bytes": result.nbytes,
            },
        )
        return 0


class _ProgressContext:
    """A rich progress bar (bytes, tensors, speed, ETA) on a terminal's stderr."""

    def __init__(self, out: Any, description: str, enabled: bool) -> None:
        self.out = out
        self.description = description
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self) -> ProgressFn | None:
        from . import _isatty, rich_progress

        if not self.enabled or getattr(self.out, "json", False) or not _isatty(self.out.stderr):
            return None
        self.bar = rich_progress(self.out.stderr, tensors=True)
        task = self.bar.add_task(self.description, total=None, tensors="0/?")
        bar = self.bar

        def update(done: int, total: int, tensors_done: int, tensors_total: int) -> None:
            bar.update(
                task,
                completed=done,
                total=total,
                tensors=f"{tensors_done}/{tensors_total}",
            )

        self.bar.start()
        return update

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def progress_bar(out: Any, description: str, *, enabled: bool = True) -> _ProgressContext:
    """Context manager giving a progress callback, or None off a terminal (or disabled)."""
    return _ProgressContext(out, description, enabled)


register_command()
