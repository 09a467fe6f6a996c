"""The ``zarrckpt`` command line (also ``python -m zarrckpt``).

Commands: ``ls``, ``info``, ``tree``, ``stats``, ``diff``, ``verify``, ``plot``,
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
import os
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
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.stderr),
            transient=True,
        )
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        with bar:
            yield update


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------ helpers


class UsageError(Exception):
    """A mistake in the command line the parser cannot see (exit code 2)."""


def _open(path: str) -> Any:
    from ..inspect._checkpoint import open as open_checkpoint

    return open_checkpoint(path)


def _select(ckpt: Any, pattern: str | None) -> list[str]:
    keys: list[str] = ckpt.select(pattern)
    if pattern is not None and not keys:
        raise UsageError(f"no tensor of checkpoint {ckpt.path!r} matches {pattern!r}")
    return keys


_PATH = Arg("path", metavar="PATH", help="checkpoint directory")
_PATTERN = Arg(
    "pattern", metavar="PATTERN", nargs="?", default=None,
    help="glob on tensor names, e.g. 'layers.*.weight' (quote it)",
)


# ----------------------------------------------------------------- commands


@command("ls", "list the tensors: name, shape, dtype, chunks, bytes", _PATH, _PATTERN)
def _ls(args: argparse.Namespace, out: Output) -> int:
    ckpt = _open(args.path)
    infos = [ckpt.tensor_info(k) for k in _select(ckpt, args.pattern)]
    if out.json:
        out.emit([i.to_dict() | {"name": i.fqn} for i in infos])
        return EXIT_OK
    total = sum(i.nbytes for i in infos)
    rows = [
        [i.fqn, fmt_shape(i.shape), i.dtype, fmt_shape(i.chunks),
         fmt_bytes(i.nbytes) if out.rich else str(i.nbytes)]
        for i in infos
    ]
    out.table(
        ["name", "shape", "dtype", "chunks", "bytes"], rows, right=["bytes"],
        optional=["chunks"],
        caption=f"{len(infos)} tensors, {fmt_bytes(total)}",
    )
    return EXIT_OK


@command("info", "format, provenance, world size and mesh, sizes, dtype histogram", _PATH)
def _info(args: argparse.Namespace, out: Output) -> int:
    info = _open(args.path).info()
    if out.json:
        out.emit(info)
        return EXIT_OK
    mesh = info.mesh if info.mesh is not None else "-"
    pairs = [
        ("path", info.path),
        ("format_version", str(info.format_version)),
        ("checkpoint_id", str(info.checkpoint_id)),
        ("created", str(info.created)),
        ("zarrckpt_version", str(info.zarrckpt_version)),
        ("torch_version", str(info.torch_version)),
        ("world_size", str(info.world_size)),
        ("mesh", json.dumps(mesh) if not isinstance(mesh, str) else mesh),
        ("tensors", str(info.tensors)),
        ("total_bytes", f"{info.total_bytes} ({fmt_bytes(info.total_bytes)})"),
        ("pickled", f"{info.pickled} ({info.pickled_bytes} bytes)"),
    ]
    pairs += [
        (f"dtype {name}", f"{d['tensors']} tensors, {d['bytes']} bytes")
        for name, d in info.dtypes.items()
    ]
    out.fields(pairs)
    return EXIT_OK


def _tree_json(node: Any) -> Any:
    if hasattr(node, "to_dict"):
        return node.to_dict()
    if isinstance(node, dict):
        return {str(k): _tree_json(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_tree_json(v) for v in node]
    return node


#: the "leaf" of a tree line that opens a non-empty container (None is a stored value)
_CONTAINER = object()


def _tree_lines(node: Any, depth: int = 0) -> Iterator[tuple[int, str, Any]]:
    """(depth, label, leaf or _CONTAINER) for each line of the tree."""
    from ..inspect._checkpoint import BytesInfo, PickledInfo, TensorInfo

    items: Any
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        if isinstance(value, (TensorInfo, PickledInfo, BytesInfo)) or not isinstance(
            value, (dict, list, tuple)
        ) or not value:
            yield depth, str(key), value
        else:
            yield depth, str(key), _CONTAINER
            yield from _tree_lines(value, depth + 1)


def _leaf_text(value: Any) -> str:
    from ..inspect._checkpoint import BytesInfo, PickledInfo, TensorInfo

    if isinstance(value, TensorInfo):
        return f"{value.dtype}{fmt_shape(value.shape)}"
    if isinstance(value, PickledInfo):
        return f"pickled ({value.nbytes} bytes)"
    if isinstance(value, BytesInfo):
        return f"{value.type} ({value.nbytes} bytes)"
    return "= " + json.dumps(_jsonable(value))


@command("tree", "the nested state-dict structure (no tensor data read)", _PATH)
def _tree(args: argparse.Namespace, out: Output) -> int:
    tree = _open(args.path).tree()
    if out.json:
        out.emit(_tree_json(tree))
        return EXIT_OK
    if not isinstance(tree, (dict, list, tuple)):
        out.line(_leaf_text(tree))
        return EXIT_OK
    if out.rich:
        from rich.markup import escape
        from rich.tree import Tree

        root = Tree(escape(args.path), guide_style="dim")
        stack = [root]
        for depth, label, leaf in _tree_lines(tree):
            del stack[depth + 1 :]
            if leaf is _CONTAINER:
                stack.append(stack[depth].add(f"[bold]{escape(label)}[/]"))
            else:
                stack[depth].add(f"{escape(label)}  [cyan]{escape(_leaf_text(leaf))}[/]")
        out.console.print(root)
        return EXIT_OK
    for depth, label, leaf in _tree_lines(tree):
        text = label if leaf is _CONTAINER else f"{label}  {_leaf_text(leaf)}"
        out.line("  " * depth + text)
    return EXIT_OK


@command(
    "stats",
    "per-tensor min, max, mean, std, L2 norm, nan/inf/zero counts (one parallel pass)",
    _PATH,
    _PATTERN,
)
def _stats(args: argparse.Namespace, out: Output) -> int:
    ckpt = _open(args.path)
    _select(ckpt, args.pattern)
    with out.progress("stats") as progress:
        stats = ckpt.stats(args.pattern, progress=progress)
    if out.json:
        out.emit({k: s.to_dict() for k, s in stats.items()})
        return EXIT_OK
    cols = ["name", "dtype", "shape", "min", "max", "mean", "std", "norm", "nan", "inf", "zeros"]
    rows = [
        [s.fqn, s.dtype, fmt_shape(s.shape), *(fmt_number(v) for v in (
            s.min, s.max, s.mean, s.std, s.norm, s.nan, s.inf, s.zeros))]
        for s in stats.values()
    ]
    out.table(cols, rows, right=cols[3:], optional=["shape", "zeros", "dtype", "std", "inf", "nan"])
    return EXIT_OK


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


@command(
    "diff",
    "compare two checkpoints: keys, shapes, dtypes, values (exit code 1 if they differ)",
    Arg("a", metavar="A", help="first checkpoint"),
    Arg("b", metavar="B", help="second checkpoint"),
    Arg("--rtol", type=_non_negative, default=0.0, help="relative tolerance (default 0)"),
    Arg("--atol", type=_non_negative, default=0.0, help="absolute tolerance (default 0)"),
    Arg("--all", action="store_true", help="also list the tensors that did not change"),
)
def _diff(args: argparse.Namespace, out: Output) -> int:
    a, b = _open(args.a), _open(args.b)
    with out.progress("diff") as progress:
        report = a.diff(b, rtol=args.rtol, atol=args.atol, progress=progress)
    code = EXIT_OK if report.identical else EXIT_DIFFERENT
    if out.json:
        out.emit(report)
        return code
    rows: list[list[str]] = []
    rows += [["added", k, "only in B"] for k in report.added]
    rows += [["removed", k, "only in A"] for k in report.removed]
    rows += [["shape", k, f"{fmt_shape(x)} -> {fmt_shape(y)}"]
             for k, (x, y) in report.shape_changed.items()]
    rows += [["kind", k, f"{x} -> {y}"] for k, (x, y) in report.kind_changed.items()]
    rows += [["value", k, f"{json.dumps(_jsonable(x))} -> {json.dumps(_jsonable(y))}"]
             for k, (x, y) in report.values_changed.items()]
    for k, d in report.tensors.items():
        if not d.changed and not args.all:
            continue
        detail = (f"different={d.different}/{d.count} max_abs={fmt_number(d.max_abs)} "
                  f"max_rel={fmt_number(d.max_rel)}")
        if d.dtype != d.other_dtype:
            detail = f"dtype {d.dtype} -> {d.other_dtype} " + detail
        rows.append(["changed" if d.changed else "same", k, detail])
    n_diff = len(rows) - sum(1 for r in rows if r[0] == "same")
    summary = (
        "identical" if report.identical
        else f"{n_diff} difference(s); {len(report.tensors) - len(report.changed)} of "
        f"{len(report.tensors)} common tensors unchanged"
    )
    if rows:
        out.table(["status", "name", "detail"], rows, title=f"A={args.a}  B={args.b}")
    if out.rich:
        out.line(summary, style="green" if report.identical else "yellow")
    elif report.identical:
        out.line("identical")
    return code


@command(
    "verify",
    "check every chunk (present, size, checksums) and the metadata; exit code 1 on any problem",
    _PATH,
)
def _verify(args: argparse.Namespace, out: Output) -> int:
    from ..inspect._checkpoint import verify

    with out.progress("verify") as progress:
        report = verify(args.path, progress=progress)
    code = EXIT_OK if report.ok else EXIT_DIFFERENT
    if out.json:
        out.emit(report)
        return code
    summary = (f"{report.arrays} arrays, {report.chunks} chunks, "
               f"{report.bytes_verified} bytes verified")
    if report.ok:
        out.line(f"OK {args.path}: {summary}", style="green")
        return code
    out.table(
        ["problem", "file", "message"],
        [[p.kind, p.file or "-", p.message] for p in report.problems],
        title=f"{args.path}: {len(report.problems)} problem(s)",
    )
    out.line(f"FAILED {args.path}: {len(report.problems)} problem(s); {summary}",
             style="bold red")
    return code


@command(
    "plot",
    "PNG of per-tensor L2 norms and value histograms (matplotlib)",
    _PATH,
    _PATTERN,
    Arg("-o", "--output", required=True, metavar="OUT.png", help="image file to write"),
    Arg("--bins", type=int, default=80, help="histogram bins (default 80)"),
    Arg("--max-hist", type=int, default=12, metavar="N",
        help="histograms of the N largest tensors (default 12)"),
)
def _plot(args: argparse.Namespace, out: Output) -> int:
    from ..inspect._plot import plot_checkpoint

    if args.bins < 1 or args.max_hist < 0:
        raise UsageError("--bins must be >= 1 and --max-hist >= 0")
    ckpt = _open(args.path)
    _select(ckpt, args.pattern)
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {args.output!r}: directory {parent!r} does not exist")
    with out.progress("plot") as progress:
        shown = plot_checkpoint(
            ckpt, args.output, pattern=args.pattern, bins=args.bins,
            max_hist=args.max_hist, progress=progress,
        )
    out.done(
        f"wrote {args.output} ({shown['tensors']} tensors, {len(shown['histograms'])} histograms)",
        {"output": args.output, **shown},
    )
    return EXIT_OK


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
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 141
