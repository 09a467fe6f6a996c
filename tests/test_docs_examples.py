"""Run every ```python block of README.md and docs/*.md.

Each block runs in a fresh namespace, in its own temporary working directory,
and must not raise. Blocks that are not meant to run must use another fence
language (```text, ```bash, ```pycon, ...): nothing is skipped silently.
Fences whose language is ``python``, ``py`` or ``python3`` are all run, so a
typo in the language cannot hide an example from this test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_LANGUAGES = {"python", "py", "python3"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    index: int  # position among the file's python blocks
    line: int  # 1-based line of the first code line
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}#{self.index}(line {self.line})"


def markdown_files() -> list[Path]:
    """README.md and docs/*.md (those that exist)."""
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    return files + sorted((ROOT / "docs").glob("*.md"))


def python_blocks(path: Path) -> list[Block]:
    """The python blocks of one Markdown file, in order.

    Raises
    ------
    ValueError
        A fence is never closed (its code would be silently lost).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip()
        language = info.split()[0].strip("{}.").lower() if info else ""
        start = i + 1
        end = start
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            end += 1
        else:
            raise ValueError(f"{path}:{i + 1}: fence {fence}{info} is never closed")
        if language in PYTHON_LANGUAGES:
            body = [
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[start:end]
            ]
            blocks.append(Block(path, len(blocks), start + 1, "\n".join(body) + "\n"))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in markdown_files() for block in python_blocks(path)]


BLOCKS = all_blocks()


def run_block(block: Block) -> None:
    """Execute ``block`` in a fresh namespace (in the current directory).

    A block guarded by ``if __name__ == "__main__":`` is a script (it spawns
    processes, which must import their functions from a real file): it is
    written to ``example.py`` and run by a fresh interpreter.
    """
    if 'if __name__ == "__main__":' in block.code:
        script = Path("example.py")
        script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise AssertionError(f"{block.id} exited with {done.returncode}:\n{done.stderr}")
        return
    # pad with blank lines so tracebacks point at the Markdown file's own line numbers
    source = "\n" * (block.line - 1) + block.code
    code = compile(source, str(block.path), "exec")
    namespace = {"__name__": "__main__", "__file__": str(block.path)}
    exec(code, namespace)


#: the bucket that object-store examples use (created on the loopback S3 server)
EXAMPLE_BUCKET = "my-bucket"


def _serve_s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the AWS_* environment at the loopback S3 server (tests/_s3.py) and make
    sure :data:`EXAMPLE_BUCKET` exists there, for a block that uses ``s3://`` URLs or the bucket."""
    import boto3

    server = request.getfixturevalue("s3_server")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=server.endpoint)
    if EXAMPLE_BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=EXAMPLE_BUCKET)


#: the container that az:// examples use (created on the loopback Azurite server)
EXAMPLE_CONTAINER = "my-container"


def _serve_azure(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the AZURE_STORAGE_* environment at the loopback Azurite server
    (tests/_azure.py) and make sure :data:`EXAMPLE_CONTAINER` exists there."""
    from azure.storage.blob import BlobServiceClient

    server = request.getfixturevalue("azure_server")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    client = BlobServiceClient.from_connection_string(server.connection_string)
    if not client.get_container_client(EXAMPLE_CONTAINER).exists():
        client.create_container(EXAMPLE_CONTAINER)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_markdown_python_block_runs(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.chdir(tmp_path)
    if "s3://" in block.code or EXAMPLE_BUCKET in block.code:
        _serve_s3(request, monkeypatch)
    if "az://" in block.code:
        _serve_azure(request, monkeypatch)
    run_block(block)


def test_guide_has_python_examples() -> None:
    guide = ROOT / "docs" / "guide.md"
    assert guide.is_file(), "docs/guide.md is missing"
    assert python_blocks(guide), "docs/guide.md has no ```python example"


def test_block_collection_finds_all_fence_forms(tmp_path: Path) -> None:
    sample = tmp_path / "sample.md"
    sample.write_text(
        "text\n"
        "```python\nx = 1\n```\n"
        "```text\nnot run\n```\n"
        "- item\n\n  ```py\n  y = 2\n  ```\n"
        "````python\nz = '```'\n````\n"
        "```Python3 title=demo\nw = 4\n```\n"
        "```bash\necho no\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(sample)
    assert [b.code for b in blocks] == ["x = 1\n", "y = 2\n", "z = '```'\n", "w = 4\n"]
    assert [b.line for b in blocks] == [3, 11, 14, 17]


def test_unclosed_fence_is_an_error(tmp_path: Path) -> None:
    sample = tmp_path / "broken.md"
    sample.write_text("```python\nx = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="never closed"):
        python_blocks(sample)


def test_failing_block_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = tmp_path / "failing.md"
    sample.write_text("```python\nassert 1 == 2, 'boom'\n```\n", encoding="utf-8")
    (block,) = python_blocks(sample)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="boom") as info:
        run_block(block)
    # the traceback points at the Markdown line of the failing statement
    assert any(entry.path == sample and entry.lineno + 1 == 2 for entry in info.traceback)
