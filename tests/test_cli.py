"""The ``zarrckpt`` console script, run for real in subprocesses.

Both entry points are exercised (``python -m zarrckpt`` and the installed
``zarrckpt`` script); output is piped (plain text) unless a test gives the
process a pseudo-terminal; ``--json`` output is parsed back.
"""

from __future__ import annotations

import json
import math
import os
import pty
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _inspect_fixtures import PRODUCERS, Produced, get_produced

import zarrckpt
from zarrckpt import cli
from zarrckpt.cli import _browse
from zarrckpt.format._marker import COMMIT_MARKER

SCRIPT = shutil.which("zarrckpt", path=os.path.dirname(sys.executable)) or "zarrckpt"
MODULE = [sys.executable, "-m", "zarrckpt"]
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "COLUMNS": "200"}


def run(*args: str, entry: Sequence[str] = MODULE, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*entry, *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def run_all(*commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run several command lines concurrently (each pays the interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda c: run(*c), commands))


def rows(stdout: str) -> list[list[str]]:
    """Plain table -> header + rows split on whitespace."""
    return [line.split() for line in stdout.splitlines() if line.strip()]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr


@pytest.fixture(scope="module", params=sorted(PRODUCERS))
def produced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Produced:
    return get_produced(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Produced:
    return get_produced("single", tmp_path_factory)


# ------------------------------------------------------------------ commands


def test_ls_piped_and_json(single: Produced) -> None:
    ckpt = zarrckpt.open(single.after)
    plain, as_json = run_all(
        ["ls", single.after],
        ["ls", single.after, "model.*", "--json"],
    )
    assert plain.returncode == 0 and plain.stderr == ""
    table = rows(plain.stdout)
    assert table[0] == ["name", "shape", "dtype", "chunks", "bytes"]
    assert [r[0] for r in table[1:]] == ckpt.keys()
    for name, shape, dtype, chunks, nbytes in table[1:]:
        info = ckpt.tensor_info(name)
        assert shape == "[" + ",".join(map(str, info.shape)) + "]"
        assert (dtype, int(nbytes)) == (info.dtype, info.nbytes)
        assert chunks == "[" + ",".join(map(str, info.chunks)) + "]"
    listed = json.loads(as_json.stdout)
    assert [x["name"] for x in listed] == [k for k in ckpt if k.startswith("model.")]
    assert listed[0]["shape"] == list(ckpt.tensor_info(listed[0]["name"]).shape)


def test_info_plain_via_installed_script(single: Produced) -> None:
    plain = run("info", single.before, entry=[SCRIPT])
    assert plain.returncode == 0, plain.stderr
    ref = zarrckpt.open(single.before).info()
    fields = dict(line.split(":", 1) for line in plain.stdout.splitlines())
    assert fields["world_size"].strip() == "1"
    assert fields["tensors"].strip() == str(ref.tensors)
    assert fields["total_bytes"].split()[0] == str(ref.total_bytes)
    assert fields["dtype float32"].strip().startswith(f"{ref.tensors} tensors")
    assert fields["format_version"].strip() == str(ref.format_version) == "3"


def test_info_json(produced: Produced) -> None:
    proc = run("info", produced.before, "--json")
    info = json.loads(proc.stdout)
    ref = zarrckpt.open(produced.before).info()
    assert info == json.loads(json.dumps(ref.to_dict()))
    assert info["world_size"] == (2 if produced.label == "fsdp2_ws2" else 1)


def test_tree(single: Produced) -> None:
    plain, as_json = run_all(["tree", single.before], ["tree", single.before, "--json"])
    tree = json.loads(as_json.stdout)
    assert tree["step"] == 1
    assert tree["model"]["emb.weight"]["shape"] == [96, 64]
    assert tree["optim"]["param_groups"][0]["lr"] == 0.01
    lines = plain.stdout.splitlines()
    assert lines[0] == "model"
    assert "  emb.weight  float32[96,64]" in lines
    assert "step  = 1" in lines
    assert any(line.startswith("      exp_avg  float32[96,64]") for line in lines)


def test_tree_shows_none_as_a_value(tmp_path: Path) -> None:
    """None is a stored value (``= null``), never a bare key like a container's."""
    import argparse
    import io

    import torch

    path = str(tmp_path / "ckpt")
    state = {"a": None, "b": {"c": None, "d": torch.zeros(2)}, "e": [None], "f": {}, "g": 0}
    zarrckpt.save(state, path, fsync=False)
    plain = run("tree", path)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == [
        "a  = null", "b", "  c  = null", "  d  float32[2]", "e", "  0  = null", "f  = {}", "g  = 0",
    ]
    buf = io.StringIO()
    out = cli.Output(stdout=buf)
    out.rich = True  # the rich tree drawn on a terminal
    assert _browse._tree(argparse.Namespace(path=path), out) == 0
    lines = [line.lstrip("│├└─ ") for line in buf.getvalue().splitlines()]
    assert lines == [
        path, "a  = null", "b", "c  = null", "d  float32[2]", "e", "0  = null", "f  = {}", "g  = 0",
    ]


def test_stats_json_equals_api(produced: Produced) -> None:
    as_json = run("stats", produced.after, "--json")
    assert as_json.returncode == 0, as_json.stderr
    got = json.loads(as_json.stdout)
    want = zarrckpt.open(produced.after).stats()
    assert list(got) == list(want)
    for fqn, s in want.items():
        for name, value in s.to_dict().items():
            if isinstance(value, float):
                assert math.isclose(got[fqn][name], value, rel_tol=1e-12), (fqn, name)
            else:
                assert got[fqn][name] == value, (fqn, name)


def test_stats_plain_table(single: Produced) -> None:
    plain = run("stats", single.after, "model.*")
    want = zarrckpt.open(single.after).stats("model.*")
    table = rows(plain.stdout)
    header = table[0]
    assert header == ["name", "dtype", "shape", "min", "max", "mean", "std", "norm", "nan",
                      "inf", "zeros"]
    assert [r[0] for r in table[1:]] == [k for k in want if k.startswith("model.")]
    w = dict(zip(header, table[1 + [r[0] for r in table[1:]].index("model.emb.weight")],
                 strict=True))
    assert float(w["norm"]) == pytest.approx(want["model.emb.weight"].norm, rel=1e-3)


def test_stats_json_non_finite(tmp_path: Path) -> None:
    path = tmp_path / "c"
    zarrckpt.save({"v": __import__("torch").tensor([1.0, float("nan"), float("inf")]),
                   "e": __import__("torch").empty(0)}, path, fsync=False)
    proc = run("stats", str(path), "--json")
    got = json.loads(proc.stdout)  # strict JSON: NaN / Infinity tokens would not be valid
    assert got["v"]["mean"] == "nan" and got["v"]["max"] == "nan"
    assert (got["v"]["nan"], got["v"]["inf"]) == (1, 1)
    assert got["e"]["count"] == 0 and got["e"]["min"] is None
    assert "NaN" not in proc.stdout and "Infinity" not in proc.stdout


def test_diff(produced: Produced) -> None:
    differ, differ_json = run_all(
        ["diff", produced.before, produced.after],
        ["diff", produced.before, produced.after, "--json"],
    )
    assert differ.returncode == 1 and differ_json.returncode == 1, differ.stderr
    table = rows(differ.stdout)
    assert table[0] == ["status", "name", "detail"]
    assert {r[1] for r in table[1:] if r[0] == "changed"} == produced.changed
    assert [r[:2] for r in table[1:] if r[0] == "value"] == [["value", "step"]]
    report = json.loads(differ_json.stdout)
    assert set(report["changed"]) == produced.changed
    assert report["identical"] is False and report["values_changed"] == {"step": [1, 2]}


def test_diff_identical_and_tolerance(single: Produced) -> None:
    same, loose = run_all(
        ["diff", single.after, single.after],
        ["diff", single.before, single.after, "--atol", "1000"],
    )
    assert same.returncode == 0 and same.stdout.strip() == "identical"
    # with a huge tolerance only the plain value "step" differs
    assert loose.returncode == 1
    assert [r[:2] for r in rows(loose.stdout)[1:]] == [["value", "step"]]


def test_verify(single: Produced, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(single.before, damaged)
    entry = zarrckpt.open(damaged)._files.arrays["model.out.weight"]
    (damaged / entry.path / entry.layout.chunk_key((0, 0))).unlink()
    (damaged / COMMIT_MARKER).unlink()
    ok, bad, bad_json = run_all(
        ["verify", single.before],
        ["verify", str(damaged)],
        ["verify", str(damaged), "--json"],
    )
    assert ok.returncode == 0 and ok.stdout.startswith(f"OK {single.before}:"), ok.stdout
    assert bad.returncode == 1 and bad_json.returncode == 1
    table = rows(bad.stdout)
    assert table[0] == ["problem", "file", "message"]
    assert sorted(r[0] for r in table[1:-1]) == ["missing_chunk", "missing_commit_marker"]
    assert table[-1][0] == "FAILED"
    report = json.loads(bad_json.stdout)
    assert report["ok"] is False and report["committed"] is False
    assert sorted((p["kind"], p["key"]) for p in report["problems"]) == [
        ("missing_chunk", "model.out.weight"), ("missing_commit_marker", None)]


def test_plot_writes_png(single: Produced, tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    proc = run("plot", single.after, "model.*", "-o", str(out), "--max-hist", "3",
               entry=[SCRIPT])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 800 and height > 500


# ------------------------------------------------------------------ errors


def test_user_mistakes_are_one_line_exit_2(single: Produced, tmp_path: Path) -> None:
    uncommitted = tmp_path / "uncommitted"
    shutil.copytree(single.before, uncommitted)
    (uncommitted / COMMIT_MARKER).unlink()
    a_file = tmp_path / "model.pt"
    a_file.write_bytes(b"not a checkpoint")
    missing, bogus, incomplete = run_all(
        ["info", str(tmp_path / "nowhere")],
        ["bogus", single.before],
        ["stats", str(uncommitted)],
    )
    assert_one_line_error(missing, r"^zarrckpt info: error: no checkpoint at .*nowhere")
    assert_one_line_error(bogus, r"invalid choice: 'bogus'")
    assert_one_line_error(incomplete, r"commit marker .* is missing")


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["ls", "{ckpt}", "--frobnicate"], r"unrecognized arguments: --frobnicate"),
        (["stats", "{ckpt}", "nothing.*"], r"no tensor .* matches 'nothing\.\*'"),
        (["ls", "{file}"], r"is a file, not a zarrckpt checkpoint directory"),
        (["diff", "{ckpt}", "{ckpt}", "--rtol", "-1"], r"--rtol: expected a number >= 0"),
        (["plot", "{ckpt}"], r"required: -o/--output"),
        (["plot", "{ckpt}", "-o", "{tmp}/no/such/dir.png"], r"does not exist"),
        (["verify", "{tmp}/nowhere"], r"no checkpoint at"),
        (["diff", "{ckpt}"], r"the following arguments are required: B"),
    ],
)
def test_more_user_mistakes_in_process(argv: list[str], pattern: str, single: Produced,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    """The same entry point (cli.main) in-process, for the remaining mistakes."""
    a_file = tmp_path / "model.pt"
    a_file.write_bytes(b"not a checkpoint")
    argv = [a.format(ckpt=single.before, file=a_file, tmp=tmp_path) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(pattern, captured.err), captured.err


def test_corrupt_data_is_exit_2_for_stats_and_1_for_verify(single: Produced,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "c"
    shutil.copytree(single.before, path)
    entry = zarrckpt.open(path)._files.arrays["model.emb.bias"]
    chunk = path / entry.path / entry.layout.chunk_key((0,))
    data = bytearray(chunk.read_bytes())
    data[3] ^= 1
    chunk.write_bytes(bytes(data))
    stats = run("stats", str(path))
    assert_one_line_error(stats, r"'model\.emb\.bias'.*checksum mismatch")
    assert cli.main(["verify", str(path), "--json"]) == 1


def test_broken_pipe_is_quiet(single: Produced) -> None:
    proc = subprocess.run(
        f"{' '.join(MODULE)} ls {single.after} | head -1", shell=True, capture_output=True,
        text=True, env=ENV, timeout=300,
    )
    assert proc.stdout.split() == ["name", "shape", "dtype", "chunks", "bytes"]
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ terminal


def test_rich_output_on_a_terminal(single: Produced) -> None:
    """On a terminal: rich table (box lines, human sizes, caption), no plain header."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*MODULE, "ls", single.after, "model.*"], stdout=slave,
                                stderr=subprocess.PIPE, env=ENV)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(master)
    text = b"".join(chunks).decode()
    assert "─" in text and "KiB" in text and "tensors," in text, text
    assert "\x1b[" in text  # styled


def test_scheduler_option_runs_on_a_cluster(single: Produced) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        proc = run("stats", single.after, "model.*", "--json", "--scheduler",
                   cluster.scheduler_address)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == set(zarrckpt.open(single.after).select("model.*"))
    assert any(str(t["key"]).startswith("zarrckpt-stats") for t in stream.data)



def test_scheduler_option_bad_address(single: Produced, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "SCHEDULER_TIMEOUT", 1.0)
    assert cli.main(["stats", single.after, "--scheduler", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect to dask scheduler" in err, err


# ------------------------------------------------------------------ in-process


def test_command_registry_accepts_a_plugin(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A subcommand is one registered function (how zarrckpt.convert adds ``convert``)."""
    monkeypatch.setattr(cli, "_COMMANDS", dict(cli._COMMANDS))
    seen = {}

    @cli.command("hello", "say hello", cli.Arg("name"), cli.Arg("--loud", action="store_true"))
    def _hello(args, out):  # type: ignore[no-untyped-def]
        seen["args"] = args
        out.done(f"hello {args.name}", {"name": args.name})
        return 0

    assert cli.main(["hello", "you", "--loud"]) == 0
    assert capsys.readouterr().out == "hello you\n" and seen["args"].loud
    assert cli.main(["hello", "you", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "you"}
    assert "convert" in cli.PLUGIN_MODULES[0]


def test_plain_table_alignment() -> None:
    import io

    buf = io.StringIO()
    out = cli.Output(stdout=buf)
    out.table(["name", "n"], [["a", "1"], ["longer", "100"]], right=["n"])
    assert buf.getvalue().splitlines() == ["name      n", "a         1", "longer  100"]


def test_every_command_on_a_terminal_in_process(single: Produced, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The rich code paths (tables, tree, progress bars) of every command."""
    monkeypatch.setattr(cli, "_isatty", lambda stream: True)
    monkeypatch.setenv("COLUMNS", "100")
    damaged = tmp_path / "damaged"
    shutil.copytree(single.before, damaged)
    (damaged / COMMIT_MARKER).unlink()
    expectations = [
        (["ls", single.after], 0, ["model.emb.weight", "KiB", "tensors,"]),
        (["info", single.after], 0, ["world_size", "float32"]),
        (["tree", single.after], 0, ["emb.weight", "float32[96,64]", "step"]),
        (["stats", single.after, "model.*"], 0, ["model.emb.weight", "norm"]),
        (["diff", single.before, single.after], 1, ["changed", "model.emb.weight",
                                                    "difference(s)"]),
        (["diff", single.after, single.after], 0, ["identical"]),
        (["verify", single.after], 0, ["OK"]),
        (["verify", str(damaged)], 1, ["missing_commit_marker", "FAILED"]),
        (["plot", single.after, "-o", str(tmp_path / "p.png"), "--max-hist", "2"], 0,
         ["wrote"]),
    ]
    for argv, code, needles in expectations:
        assert cli.main(argv) == code, argv
        out = capsys.readouterr().out
        for needle in needles:
            assert needle in out, (argv, needle, out)
    assert (tmp_path / "p.png").stat().st_size > 10_000
