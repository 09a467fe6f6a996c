"""Verify a checkpoint directory, reporting every problem found.

Unlike :func:`zarrckpt.open`, verification works on checkpoints that cannot be
opened: without a commit marker, with damaged metadata or damaged chunks. It
checks, in this order and without stopping at the first problem:

1. the commit marker (present, valid, a known format version);
2. the root ``zarr.json`` (present, matching the marker's crc32c, holding a manifest);
3. every array's ``zarr.json`` against the manifest (shape, dtype, chunks, codecs);
4. every chunk file: present, of the exact expected size, and every checksum
   (plain chunk, shard index, each inner chunk) correct, read in parallel
   with dask through zarrckpt's own chunk reader.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, ZarrCkptError
from ..format._chunk_reader import ChunkReader
from ..format._codec import crc32c, expected_chunk_size
from ..format._json import loads_json
from ..format._layout import ArrayLayout, Region
from ..format._marker import (
    COMMIT_MARKER,
    FORMAT_NAME,
    FORMAT_VERSION,
    ROOT_METADATA,
    marker_location_problem,
    parse_commit_marker,
)
from ..format._metadata import ArrayEntry, check_array_document, parse_entry
from ..storage._base import Store
from ..storage._local import open_store
from ..storage._paths import check_path
from ._scan import Progress, Slab, pack, plan_slabs, run_tasks, what

__all__ = ["Problem", "VerifyReport", "verify", "PROBLEM_KINDS"]

#: every ``Problem.kind`` verify can report, with its meaning
PROBLEM_KINDS = {
    "missing_commit_marker": "the commit marker is absent: the save never finished",
    "bad_commit_marker": "the commit marker is unreadable or not a zarrckpt marker",
    "unsupported_version": "the checkpoint format is newer than this zarrckpt",
    "root_metadata": "the root zarr.json is missing, unreadable or does not match the marker",
    "manifest": "the manifest (root zarr.json attributes) is malformed",
    "array_metadata": "an array's zarr.json is missing, malformed or disagrees with the manifest",
    "missing_chunk": "a chunk file is missing",
    "truncated_chunk": "a chunk file is shorter than its layout requires",
    "oversized_chunk": "a chunk file is longer than its layout requires",
    "checksum": "stored bytes do not match their crc32c (chunk, shard index or inner chunk)",
}


@dataclass(frozen=True)
class Problem:
    """One problem found by :func:`verify`.

    Attributes
    ----------
    kind
        One of :data:`PROBLEM_KINDS`.
    message
        Human-readable description naming the key, file and expectation.
    key
        FQN of the affected tensor, if any.
    file
        Affected file, relative to the checkpoint directory, if any.
    """

    kind: str
    message: str
    key: str | None = None
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "file": self.file, "message": self.message}


@dataclass
class VerifyReport:
    """Result of :func:`verify`.

    Attributes
    ----------
    path
        Checkpoint directory.
    committed
        The commit marker is present and valid.
    problems
        Every problem found (empty when the checkpoint is intact).
    arrays, chunks, bytes_verified
        Number of arrays and chunk files checked, and payload bytes whose
        checksums were verified.
    leftovers
        What dead saves to this location left behind (stale staging directories
        beside a local checkpoint, objects outside the manifest on an object
        store): not part of the checkpoint, removed by the next save there;
        listed for information, not counted as problems.
    """

    path: str
    committed: bool = False
    problems: list[Problem] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    bytes_verified: int = 0
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    def kinds(self) -> set[str]:
        """The set of problem kinds found."""
        return {p.kind for p in self.problems}

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "committed": self.committed,
            "arrays": self.arrays,
            "chunks": self.chunks,
            "bytes_verified": self.bytes_verified,
            "problems": [p.to_dict() for p in self.problems],
            "leftovers": list(self.leftovers),
        }

    def __str__(self) -> str:
        if self.ok:
            lines = [
                f"{self.path}: OK ({self.arrays} arrays, {self.chunks} chunks, "
                f"{self.bytes_verified} bytes verified)"
            ]
        else:
            lines = [f"{self.path}: {len(self.problems)} problem(s)"]
            lines += [f"  {p.kind}: {p.message}" for p in self.problems]
        lines += [f"  left by a dead save (removed by the next save): {x}" for x in self.leftovers]
        return "\n".join(lines)


# --------------------------------------------------------------------- chunks


def _inner_regions(layout: ArrayLayout, index: tuple[int, ...], region: Region) -> list[Region]:
    """Inner-chunk regions of chunk ``index`` that lie inside ``region``."""
    out = []
    for inner in layout.inner_indices():
        r = layout.inner_region(index, inner)
        if all(b > a for a, b in r) and all(
            a0 <= a and b <= b0 for (a, b), (a0, b0) in zip(r, region, strict=True)
        ):
            out.append(r)
    return out


def _check_slab(root: Store, slab: Slab) -> tuple[list[Problem], int]:
    """Problems of one slab, and the payload bytes whose checksums were verified."""
    entry, layout = slab.entry, slab.entry.layout
    key = layout.chunk_key(slab.chunk)
    rel = f"{entry.path}/{key}"
    expected = expected_chunk_size(layout, slab.chunk)
    # a format-3 shard file may hold page-alignment gaps between pieces: at least
    # the packed size (its index, checked when read, must fit in the file)
    gaps = layout.inner_shape is not None and layout.index_location == "start"
    try:
        size = root.size(rel)
    except FileNotFoundError:
        if not slab.first:
            return [], 0
        return [Problem("missing_chunk", f"{what(root, entry)}: chunk {key!r} is missing "
                        f"(expected file {rel!r} of {expected} bytes)", entry.fqn, rel)], 0
    if gaps and size >= layout.index_nbytes:
        expected = max(expected, _shard_end(root, rel, layout) or 0)
    if size < expected or (size > expected and not gaps):
        if not slab.first:
            return [], 0
        kind = "truncated_chunk" if size < expected else "oversized_chunk"
        adj = "truncated" if size < expected else "too long"
        return [Problem(kind, f"{what(root, entry)}: chunk {key!r} is {adj}: {size} bytes, "
                        f"expected {expected}", entry.fqn, rel)], 0
    reader = ChunkReader(root, entry.path, layout, what(root, entry), crcs=entry.crc_values())
    nbytes = slab.nbytes
    try:
        _read(reader, entry, slab.region)
        return [], nbytes
    except CorruptCheckpointError as e:
        first_error = str(e)
    if layout.inner_shape is None:
        return [Problem("checksum", first_error, entry.fqn, rel)], 0
    # find every damaged inner chunk of the slab, not only the first one
    problems = []
    for region in _inner_regions(layout, slab.chunk, slab.region):
        try:
            _read(reader, entry, region)
        except CorruptCheckpointError as e:
            problems.append(Problem("checksum", str(e), entry.fqn, rel))
    if not problems:  # e.g. the shard index itself
        problems.append(Problem("checksum", first_error, entry.fqn, rel))
    return problems, 0


def _shard_end(root: Store, key: str, layout: ArrayLayout) -> int | None:
    """End of the last inner chunk that the index (at the start of a format-3 shard
    file) records: the file's size as written; None if the index is damaged (the
    read reports it)."""
    n = layout.index_nbytes
    raw = bytearray(n)
    with root.open_reader(key) as reader:
        if reader.readv_into([memoryview(raw)], 0) != n:
            return None
    if crc32c(memoryview(raw)[:-4]) != int.from_bytes(raw[-4:], "little"):
        return None
    table = np.frombuffer(bytes(raw[:-4]), dtype="<u8").reshape(-1, 2)
    present = table[:, 0] != np.uint64(2**64 - 1)
    if not present.any():
        return n
    ends = table[present, 0].astype(object) + table[present, 1].astype(object)
    return int(max(ends))


def _read(reader: ChunkReader, entry: ArrayEntry, region: Region) -> None:
    dest = np.empty(tuple(b - a for a, b in region), dtype=entry.dtype.numpy_dtype)
    if dest.size:
        reader.read_into(dest, tuple(a for a, _ in region))


def _verify_task(slabs: list[Slab], root: Store) -> tuple[list[Problem], int]:
    problems: list[Problem] = []
    nbytes = 0
    for slab in slabs:
        p, n = _check_slab(root, slab)
        problems += p
        nbytes += n
    return problems, nbytes


# ------------------------------------------------------------------ metadata


def _read_marker(store: Store, report: VerifyReport) -> tuple[str, dict[str, Any] | None]:
    """(where the marker is, its members or None after reporting the problem)."""
    path = store.path
    name = store.find_commit_marker()
    try:
        document = loads_json(store.read_small(name))
    except FileNotFoundError:
        report.problems.append(Problem(
            "missing_commit_marker",
            f"checkpoint {path!r}: commit marker {COMMIT_MARKER!r} is missing (the save "
            "that wrote it did not finish; zarrckpt.load and zarrckpt.open refuse it)",
            file=COMMIT_MARKER,
        ))
        return name, None
    except (OSError, ValueError) as e:
        report.problems.append(Problem(
            "bad_commit_marker",
            f"checkpoint {path!r}: commit marker {name!r} is not valid JSON ({e})",
            file=name,
        ))
        return name, None
    marker = parse_commit_marker(document, name)
    if marker is None:
        report.problems.append(Problem(
            "bad_commit_marker",
            f"checkpoint {path!r}: {name!r} is not a zarrckpt commit marker "
            f"(expected a JSON object with format {FORMAT_NAME!r})",
            file=name,
        ))
    return name, marker


def _read_manifest(store: Store, marker: dict[str, Any] | None, report: VerifyReport
                   ) -> dict[str, Any] | None:
    path = store.path
    try:
        root_bytes = store.read_small(ROOT_METADATA)
    except FileNotFoundError:
        report.problems.append(Problem(
            "root_metadata", f"checkpoint {path!r}: root metadata {ROOT_METADATA!r} is missing",
            file=ROOT_METADATA,
        ))
        return None
    if marker is not None and crc32c(root_bytes) != marker.get("root_metadata_crc32c"):
        report.problems.append(Problem(
            "root_metadata",
            f"checkpoint {path!r}: root metadata {ROOT_METADATA!r} does not match the crc32c "
            f"recorded in the commit marker ({marker.get('root_metadata_crc32c')!r} expected, "
            f"{crc32c(root_bytes)} computed)",
            file=ROOT_METADATA,
        ))
    try:
        manifest = loads_json(root_bytes)["attributes"][FORMAT_NAME]
        if not isinstance(manifest, dict):
            raise TypeError("manifest is not a JSON object")
    except (ValueError, KeyError, TypeError) as e:
        report.problems.append(Problem(
            "root_metadata",
            f"checkpoint {path!r}: root metadata {ROOT_METADATA!r} is not a zarrckpt group "
            f"document with a manifest ({e!r})",
            file=ROOT_METADATA,
        ))
        return None
    return manifest


def _entries(path: str, manifest: dict[str, Any], report: VerifyReport) -> list[ArrayEntry]:
    entries = []
    for section in ("arrays", "pickled", "bytes"):
        records = manifest.get(section, {})
        if not isinstance(records, dict):
            report.problems.append(Problem(
                "manifest", f"checkpoint {path!r}: manifest section {section!r} is not an object",
                file=ROOT_METADATA,
            ))
            continue
        for fqn, raw in records.items():
            try:
                entry = parse_entry(
                    fqn, raw, checkpoint=path, format_version=manifest.get("format_version")
                )
                parts = entry.path.split("/")
                if not entry.path or entry.path.startswith("/") or ".." in parts:
                    raise CorruptCheckpointError(
                        f"checkpoint {path!r}: manifest record of {fqn!r} has array path "
                        f"{entry.path!r}, which is not a relative path inside the checkpoint"
                    )
                if any(s < 0 for s in entry.shape) or any(c <= 0 for c in entry.layout.chunk_shape):
                    raise CorruptCheckpointError(
                        f"checkpoint {path!r}: manifest record of {fqn!r} has an invalid "
                        f"shape {list(entry.shape)} or chunk shape {list(entry.layout.chunk_shape)}"
                    )
            except (CorruptCheckpointError, ZarrCkptError) as e:
                report.problems.append(Problem("manifest", str(e), fqn, ROOT_METADATA))
                continue
            entries.append(entry)
    return entries


def _check_array_metadata(store: Store, entry: ArrayEntry) -> Problem | None:
    path = store.path
    rel = f"{entry.path}/zarr.json"
    try:
        document = loads_json(store.read_small(rel))
        check_array_document(entry, document, checkpoint=path)
    except FileNotFoundError:
        return Problem("array_metadata", f"checkpoint {path!r}, key {entry.fqn!r}: array "
                       f"metadata {rel!r} is missing", entry.fqn, rel)
    except ValueError as e:  # JSON errors and CorruptCheckpointError
        return Problem("array_metadata", f"checkpoint {path!r}, key {entry.fqn!r}: array "
                       f"metadata {rel!r} is invalid: {e}", entry.fqn, rel)
    return None


def verify(path: str | os.PathLike[str], *, progress: Progress | None = None) -> VerifyReport:
    """Check a checkpoint directory completely and report every problem found.

    Works on any checkpoint directory, committed or not (a missing commit
    marker is reported, and the arrays are still checked). Reads every stored
    byte once, in parallel on the active dask scheduler.

    Parameters
    ----------
    path
        Checkpoint directory.
    progress
        Optional ``progress(done_bytes, total_bytes)`` callback.

    Returns
    -------
    VerifyReport
        ``report.ok`` is True when the checkpoint is intact.

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        Nothing at ``path``, or a file rather than a directory.
    """
    path = check_path(path)
    store = open_store(path)
    kind = store.kind()
    if kind == "missing":
        raise CheckpointNotFoundError(f"no checkpoint at {path!r}")
    if kind != "dir":
        raise CheckpointNotFoundError(f"{path!r} is a file, not a zarrckpt checkpoint directory")
    report = VerifyReport(path)
    report.leftovers = [*store.stale_stagings(), *store.leftovers()]
    marker_name, marker = _read_marker(store, report)
    if marker is not None:
        version = marker.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            report.problems.append(Problem(
                "unsupported_version",
                f"checkpoint {path!r} has format version {version!r}; this zarrckpt verifies "
                f"versions up to {FORMAT_VERSION}",
                file=marker_name,
            ))
            return report
        location = marker_location_problem(path, marker_name, version)
        if location is not None:
            report.problems.append(Problem("bad_commit_marker", location, file=marker_name))
        else:
            report.committed = True
    manifest = _read_manifest(store, marker, report)
    if manifest is None:
        return report
    entries = _entries(path, manifest, report)
    report.arrays = len(entries)
    report.chunks = sum(math.prod(e.layout.grid_shape) for e in entries)
    for entry in entries:
        problem = _check_array_metadata(store, entry)
        if problem is not None:
            report.problems.append(problem)

    slabs = plan_slabs(entries)
    groups = pack(slabs, lambda s: max(s.nbytes, 4096))
    parts = run_tasks(
        _verify_task,
        groups,
        (store,),
        weights=[sum(s.nbytes for s in g) for g in groups],
        progress=progress,
        name="zarrckpt-verify",
    )
    seen: set[tuple[str, str | None, str]] = set()
    for problems, nbytes in parts:
        report.bytes_verified += nbytes
        for p in problems:
            ident = (p.kind, p.key, p.message)
            if ident not in seen:
                seen.add(ident)
                report.problems.append(p)
    return report
