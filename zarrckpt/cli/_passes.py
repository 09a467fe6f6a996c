"""The commands that read every value of a checkpoint: ``stats``, ``diff``, ``verify``, ``plot``.

Registered with :func:`zarrckpt.cli.command` when :mod:`zarrckpt.cli` is imported.
"""

from __future__ import annotations

import argparse
import json
import os

from . import (
    EXIT_DIFFERENT,
    EXIT_OK,
    Arg,
    Output,
    UsageError,
    _jsonable,
    command,
    fmt_number,
    fmt_shape,
)
from ._browse import _PATH, _PATTERN, _open, _select


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
    for leftover in report.leftovers:
        out.line(f"left by a dead save (the next save removes it): {leftover}")
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
    from ..storage._files import is_dir

    if args.bins < 1 or args.max_hist < 0:
        raise UsageError("--bins must be >= 1 and --max-hist >= 0")
    ckpt = _open(args.path)
    _select(ckpt, args.pattern)
    parent = os.path.dirname(os.path.abspath(args.output))
    if not is_dir(parent):
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
