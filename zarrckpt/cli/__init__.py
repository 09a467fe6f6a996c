"""The ``zarrckpt`` command line (also ``python -m zarrckpt``).

Commands: ``ls``, ``info``, ``tree``, ``stats``, ``diff``, ``verify``, ``plot``, ``gc``,
plus any registered by plug-in modules (``convert``, from :mod:`zarrckpt.cli.convert`).

Start-up is kept cheap: ``zarrckpt --help`` imports neither torch, numpy nor
zarr, and the commands that only read a checkpoint never import torch (the
inspection modules and ``zarrckpt/__init__`` import it only where a tensor is
produced); ``tests/test_cli_imports.py`` checks this.

Output is a rich table (and progress bars on stderr) on a terminal, plain
aligned text when piped, and JSON with ``--json`` (non-finite floats as the
strings ``"nan"``, ``"inf"``, ``"-inf"``, so any JSON parser reads it).

Exit codes: 0 success; 1 differences found (``diff``) or verification failed
(``verify``); 2 usage error or unreadable input (one line on stderr, no
traceback); 3 internal error (a bug: the traceback is printed); 130 interrupted.

Adding a command
----------------
A command is one function registered with :func:`command`; modules listed in
:data:`PLUGIN_MODULES` are imported when the parser is built, so
``zarrckpt/cli/convert.py`` adds ``zarrckpt convert`` with (a plug-in module
should import its heavy dependencies inside the command function)::

    from zarrckpt.cli import Arg, command

    @command(
        "convert",
        "convert torch.save / DCP / safetensors files to and from zarrckpt",
        Arg("src", help="source file or directory"),
        Arg("dst", help="destination"),
        Arg("--from", dest="src_format", choices=["torch", "dcp", "safetensors", "zarrckpt"]),
    )
    def _convert_command(args: argparse.Namespace, out: Output) -> int:
        ...                                   # raise ZarrCkptError / OSError on bad input
        out.done(f"wrote {args.dst}", {"output": args.dst})
        return 0

Every command also gets ``--json``, ``--plain`` and ``--scheduler``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

__all__ = [
    "Arg",
    "Command",
    "Output",
    "UsageError",
    "build_parser",
    "command",
    "fmt_bytes",
    "fmt_number",
    "fmt_shape",
    "main",
    "PLUGIN_MODULES",
]

#: modules imported when the parser is built; each may register commands with @command
PLUGIN_MODULES: tuple[str, ...] = ("zarrckpt.cli.convert",)

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
#: seconds to wait for a ``--scheduler`` to answer
SCHEDULER_TIMEOUT = 10.0


class Arg:
    """Arguments of :meth:`argparse.ArgumentParser.add_argument`, kept for later."""

    def __init__(self, *flags: str, **kwargs: Any) -> None:
        self.flags = flags
        self.kwargs = kwargs


@dataclass
class Command:
    """A registered subcommand."""

    name: str
    help: str
    run: Callable[[argparse.Namespace, Output], int]
    arguments: tuple[Arg, ...]


_COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, *arguments: Arg
) -> Callable[[Callable[[argparse.Namespace, Output], int]], Callable[..., int]]:
    """Register ``func(args, out) -> exit code`` as the subcommand ``name``.

    Parameters
    ----------
    name
        Subcommand name (``zarrckpt NAME ...``).
    help
        One-line description shown by ``zarrckpt --help``.
    arguments
        :class:`Arg` objects, passed to ``add_argument`` in order.
    """

    def register(func: Callable[[argparse.Namespace, Output], int]) -> Callable[..., int]:
        _COMMANDS[name] = Command(name, help, func, tuple(arguments))
        return func

    return register


# ------------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: tuples as lists, non-finite floats as strings, objects via to_dict."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    if isinstance(value, (bytes, bytearray)):
        return {type(value).__name__: len(value)}
    return value


def fmt_number(value: Any) -> str:
    """Compact number: ``-`` for None, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)


def fmt_shape(shape: Sequence[int]) -> str:
    """``[3,4]`` (no spaces, so plain output splits on whitespace)."""
    return "[" + ",".join(str(s) for s in shape) + "]"


def fmt_bytes(n: int) -> str:
    """Human-readable size (binary units)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class Output:
    """Where a command writes: rich on a terminal, plain text when piped, or JSON.

    Parameters
    ----------
    json_mode
        Write one JSON document (``emit``/``done`` payloads) instead of text.
    plain
        Force plain text even on a terminal.
    stdout, stderr
        Streams (default: ``sys.stdout`` / ``sys.stderr``).
    """

    def __init__(
        self,
        *,
        json_mode: bool = False,
        plain: bool = False,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
    ) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.json = json_mode
        self.rich = not json_mode and not plain and _isatty(self.stdout)
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stdout, highlight=False)
        return self._console

    def emit(self, payload: Any) -> None:
        """Write the JSON document of a command (only in ``--json`` mode)."""
        self.stdout.write(json.dumps(_jsonable(payload), indent=2) + "\n")

    def line(self, text: str = "", style: str | None = None) -> None:
        """One line of text (styled on a terminal)."""
        if self.rich:
            from rich.text import Text

            self.console.print(Text(text, style=style or ""))
        else:
            self.stdout.write(text + "\n")

    def done(self, text: str, payload: Any) -> None:
        """Final message: ``text`` for people, ``payload`` in ``--json`` mode."""
        if self.json:
            self.emit(payload)
        else:
            self.line(text)

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        right: Sequence[str] = (),
        optional: Sequence[str] = (),
        title: str | None = None,
        caption: str | None = None,
    ) -> None:
        """A table: rich on a terminal; aligned columns with a header line when piped.

        ``title`` and ``caption`` are shown on a terminal only, so that piped
        output is exactly one header line plus one line per row. On a terminal
        too narrow for every column, the ``optional`` ones are hidden, in order.
        """
        if self.rich:
            from rich import box
            from rich.table import Table

            widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
            keep = list(range(len(columns)))

            def needed() -> int:
                return min(widths[0], 20) + sum(widths[i] + 3 for i in keep[1:]) + 3

            hidden = []
            for name in optional:
                if needed() <= self.console.width:
                    break
                keep.remove(columns.index(name))
                hidden.append(name)
            if hidden:
                note = f"hidden on this narrow terminal: {', '.join(hidden)} (use --plain)"
                caption = f"{caption}; {note}" if caption else note
            table = Table(box=box.SIMPLE_HEAD, title=title, caption=caption,
                          title_justify="left", pad_edge=False)
            fits = needed() <= self.console.width
            for i in keep:
                # the first column (names) folds; short value columns never shrink
                short = fits and i > 0 and widths[i] <= 24
                table.add_column(
                    columns[i],
                    justify="right" if columns[i] in right else "left",
                    overflow="fold",
                    no_wrap=short,
                    min_width=widths[i] if short else min(widths[i], 20 if fits else 8),
                )
            for row in rows:
                table.add_row(*(row[i] for i in keep))
            self.console.print(table)
            return
        widths = [len(c) for c in columns]
        for row in rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

        def render(cells: Sequence[str]) -> str:
            parts = []
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
                last = i == len(cells) - 1
                if columns[i] in right:
                    parts.append(cell.rjust(w))
                else:
                    parts.append(cell if last else cell.ljust(w))
            return "  ".join(parts).rstrip()

        self.stdout.write(render(columns) + "\n")
        for row in rows:
            self.stdout.write(render(row) + "\n")

    def fields(self, pairs: Sequence[tuple[str, str]], title: str | None = None) -> None:
        """``key: value`` lines (a two-column grid on a terminal)."""
        if self.rich:
            from rich.table import Table

            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column()
            for k, v in pairs:
                grid.add_row(k, v)
            if title:
                self.console.print(title, style="bold")
            self.console.print(grid)
            return
        width = max((len(k) for k, _ in pairs), default=0) + 1
        for k, v in pairs:
            self.stdout.write(f"{(k + ':').ljust(width)} {v}\n")

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Callable[[int, int], None] | None]:
        """A ``progress(done_bytes, total_bytes)`` callback drawing a bar on a
        terminal's stderr, or None when stderr is not a terminal."""
        if self.json or not _isatty(self.stderr):
            yield None
            return
        bar = rich_progress(self.stderr)
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        with bar:
            yield update


def rich_progress(stderr: Any, *, tensors: bool = False) -> Any:
    """A transient rich progress bar on ``stderr``: bytes, speed, ETA, and with
    ``tensors`` a ``{task.fields[tensors]} tensors`` column."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
    ]
    if tensors:
        columns.append(TextColumn("{task.fields[tensors]} tensors"))
    columns += [TransferSpeedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=Console(file=stderr), transient=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------ helpers


class UsageError(Exception):
    """A mistake in the command line the parser cannot see (exit code 2)."""


# ------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _load_plugins() -> None:
    for name in PLUGIN_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            importlib.import_module(name)
        except Exception as e:  # a broken plug-in must not break the other commands
            sys.stderr.write(f"zarrckpt: warning: commands of {name} unavailable: {e}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered command (plug-ins included)."""
    from .._version import __version__

    _load_plugins()
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="write JSON for scripts")
    common.add_argument("--plain", action="store_true",
                        help="plain text even on a terminal (no colours, no progress bars)")
    common.add_argument("--scheduler", metavar="ADDRESS", default=None,
                        help="dask.distributed scheduler to run on (default: local threads)")
    parser = _Parser(
        prog="zarrckpt",
        description="Inspect zarrckpt checkpoints offline (no GPU, no torch.distributed).",
        epilog="Exit codes: 0 ok, 1 differences found / verification failed, "
        "2 usage error or unreadable input.",
    )
    parser.add_argument("--version", action="version", version=f"zarrckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for cmd in _COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, parents=[common])
        for arg in cmd.arguments:
            p.add_argument(*arg.flags, **arg.kwargs)
        p.set_defaults(_command=cmd)
    return parser


@contextlib.contextmanager
def _scheduler(address: str | None) -> Iterator[None]:
    if address is None:
        yield
        return
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs the 'distributed' package") from None
    try:
        client = Client(address, timeout=SCHEDULER_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as e:
        raise UsageError(f"cannot connect to dask scheduler {address!r}: {e}") from None
    with client:
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    from ..errors import ZarrCkptError

    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(json_mode=args.json, plain=args.plain)
    try:
        with _scheduler(args.scheduler):
            code = int(args._command.run(args, out))
        sys.stdout.flush()  # a closed pipe shows up here, not at exit
        return code
    except (ZarrCkptError, UsageError) as e:
        sys.stderr.write(f"zarrckpt {args.command}: error: {_one_line(e)}\n")
        return EXIT_USAGE
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        sys.stderr.write(f"zarrckpt {args.command}: error: {_one_line(e)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"zarrckpt {args.command}: interrupted\n")
        return 130
    except Exception:
        traceback.print_exc()
        sys.stderr.write(f"zarrckpt {args.command}: internal error (a bug; please report it)\n")
        return EXIT_INTERNAL


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.strerror}: {e.filename!r}"
    return " ".join(text.split())


def _broken_pipe() -> int:
    """The reader of our stdout went away (``| head``): stop quietly."""
    from ..storage._files import redirect_fd_to_devnull

    with contextlib.suppress(OSError):
        redirect_fd_to_devnull(sys.stdout.fileno())
    return 141


# the built-in commands register themselves with @command (eagerly: tests swap _COMMANDS)
from . import _browse, _passes, _steps  # noqa: E402,F401
