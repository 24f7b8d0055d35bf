"""The input plan: the job's inputs cut into partitions, listed on the driver without reading any row.

A partition is the unit of reading, resume and exactly-once bookkeeping (see `reading` and `commit`):
- `prefix`: a folder directly under an `images` input.uri, listed recursively by a read task on a worker;
- `files`: a page of up to PAGE_FILES image files that sit directly in input.uri (the driver lists one level);
- `parquet`: one Parquet file, read in record batches by a read task;
- `manifest`: a byte range of a manifest file (one URI per line, or JSON lines), so no listing at all.

The driver keeps one small record per partition, never a row: 10x the inputs costs the driver 10x the
partitions (files or folders), not 10x the rows. Partition ids are stable across attempts of one job as long as
the inputs do not change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer_job import storage
from batchinfer_job.spec import InputSpec

PAGE_FILES = 1024  # image files per `files` partition
# A manifest's byte ranges: ~1,000 URIs of 64 bytes each, as many as a page of files, so that on few CPUs reading
# and decoding interleave (one 8 MiB range per 10,000-line manifest left its first row at 2x the same files as a
# folder); a manifest of more than 256 MiB gets larger ranges, at most MANIFEST_MAX_RANGES of them.
MANIFEST_CHUNK_BYTES = 64 * 2**10
MANIFEST_MAX_RANGES = 4096
MANIFEST_SUFFIXES = (".txt", ".lst", ".manifest", ".jsonl")


class InputError(ValueError):
    """The inputs cannot be read as input.* describes."""


@dataclass(frozen=True)
class Partition:
    """What one read task reads. `cap`: only the first `cap` rows (input.limit)."""

    id: str
    kind: str  # prefix | files | parquet | manifest
    uri: str  # the folder, the Parquet file or the manifest file
    names: tuple[str, ...] = ()  # kind=files: the files' URIs
    start: int = 0  # kind=manifest: byte range [start, end)
    end: int = 0
    cap: int | None = None

    def as_row(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "uri": self.uri, "names": list(self.names), "start": self.start,
                "end": self.end, "cap": -1 if self.cap is None else self.cap}  # fmt: skip

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Partition:
        cap = int(row["cap"])
        return cls(str(row["id"]), str(row["kind"]), str(row["uri"]), tuple(str(n) for n in row["names"]),
                   int(row["start"]), int(row["end"]), None if cap < 0 else cap)  # fmt: skip


@dataclass
class InputPlan:
    """Every partition of the job, in order, and what the driver's listing passed over, by reason."""

    partitions: list[Partition]
    skipped: dict[str, int] = field(default_factory=dict)


def _images_plan(spec: InputSpec) -> InputPlan:
    location = storage.resolve(spec.uri)
    if not location.fs.exists(location.path):
        raise storage.StorageError(f"input.uri {spec.uri!r} does not exist; check the path and credentials")
    if location.fs.isfile(location.path):
        listing = storage.list_inputs(location, storage.IMAGE_SUFFIXES)
        return InputPlan(_pages(location, [location.uri_of(p) for p in listing.paths]), listing.skipped)
    top = storage.list_top_level(location, storage.IMAGE_SUFFIXES)
    partitions = [Partition(f"{location.uri_of(p)}/", "prefix", location.uri_of(p)) for p in top.folders]
    partitions += _pages(location, [location.uri_of(p) for p in top.paths])
    return InputPlan(partitions, top.skipped)


def _pages(location: storage.Location, uris: list[str]) -> list[Partition]:
    pages = [tuple(uris[i : i + PAGE_FILES]) for i in range(0, len(uris), PAGE_FILES)]
    return [Partition(f"{location.uri}#files-{n}", "files", location.uri, page) for n, page in enumerate(pages)]


def _parquet_plan(spec: InputSpec) -> InputPlan:
    location = storage.resolve(spec.uri)
    listing = storage.list_inputs(location, (".parquet",))
    if not listing.paths:
        raise InputError(f"input.uri {spec.uri!r} holds no .parquet files; check input.format")
    first = listing.paths[0]  # the common mistake fails before anything runs; read tasks check their own file
    check_parquet_columns(spec, location.uri_of(first), pq.read_schema(first, filesystem=location.arrow_fs))
    partitions = [Partition(location.uri_of(p), "parquet", location.uri_of(p)) for p in listing.paths]
    return InputPlan(partitions, listing.skipped)


def rows_at_least(partitions: Iterable[Partition]) -> int:
    """A lower bound on the rows of `partitions`, from the plan alone: a page of listed files is its files (or its
    cap); a folder, a Parquet file or a manifest chunk is counted only once read, so 0 here (or its cap)."""
    return sum(
        min(len(p.names), p.cap if p.cap is not None else len(p.names)) if p.kind == "files" else 0 for p in partitions
    )


def wanted_columns(spec: InputSpec) -> list[str]:
    return [c for c in (spec.keyColumn, spec.imageColumn, spec.pathColumn) if c]


def check_parquet_columns(spec: InputSpec, uri: str, schema: pa.Schema) -> None:
    """InputError unless a Parquet file (`uri`, its `schema`) has every column input.* names, of a type that
    fits: image bytes binary, paths strings."""
    names = schema.names
    missing = [c for c in wanted_columns(spec) if c not in names]
    if missing:
        raise InputError(
            f"input columns {missing} not in {uri} (has {names}); fix input.imageColumn/pathColumn/keyColumn"
        )
    kinds = [
        (spec.imageColumn, (pa.types.is_binary, pa.types.is_large_binary), "encoded image bytes (binary)",
         "; for paths to images use input.pathColumn"),
        (spec.pathColumn, (pa.types.is_string, pa.types.is_large_string), "paths (strings)",
         "; for image bytes use input.imageColumn"),
    ]  # fmt: skip
    for column, fits, holds, hint in kinds:
        if column and not any(fit(schema.field(column).type) for fit in fits):
            field = "input.imageColumn" if column == spec.imageColumn else "input.pathColumn"
            raise InputError(
                f"{field} {column!r} in {uri} is of type {schema.field(column).type}; it must hold {holds}{hint}"
            )


def _manifest_plan(spec: InputSpec) -> InputPlan:
    location = storage.resolve(spec.uri)
    listing = storage.list_inputs(location, MANIFEST_SUFFIXES)
    if not listing.paths:
        raise InputError(
            f"input.uri {spec.uri!r} holds no manifest files ({' '.join(MANIFEST_SUFFIXES)}); check input.format"
        )
    partitions = []
    for path in listing.paths:
        size, uri = int(location.fs.size(path)), location.uri_of(path)
        chunk = max(MANIFEST_CHUNK_BYTES, -(-size // MANIFEST_MAX_RANGES))
        for start in range(0, max(size, 1), chunk):
            end = min(start + chunk, size)
            partitions.append(Partition(f"{uri}#bytes={start}-{end}", "manifest", uri, start=start, end=end))
    return InputPlan(partitions, listing.skipped)


_PLANNERS: dict[str, Callable[[InputSpec], InputPlan]] = {
    "images": _images_plan,
    "parquet": _parquet_plan,
    "manifest": _manifest_plan,
}


def plan_inputs(spec: InputSpec, count_rows: Callable[[Partition], Iterable[int]] | None = None) -> InputPlan:
    """Every partition of the job; InputError when there are none.

    With input.limit, `count_rows(partition)` (the reader's own row counts, batch by batch) finds where the limit
    falls: the partitions after it are dropped and the one it falls in gets a `cap`.
    """
    plan = _PLANNERS[spec.format](spec)
    if not plan.partitions:
        skipped = "; ".join(f"{n} {reason}" for reason, n in plan.skipped.items())
        raise InputError(
            f"input.uri {spec.uri!r} holds no inputs of format {spec.format!r}"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    if spec.limit is not None:
        if count_rows is None:
            raise ValueError("input.limit needs count_rows")
        plan.partitions = _limited(plan.partitions, spec.limit, count_rows)
    return plan


def _limited(partitions: list[Partition], limit: int, count_rows: Callable[[Partition], Iterable[int]]) -> list:
    kept: list[Partition] = []
    left = limit
    for partition in partitions:
        rows = 0
        for rows_in_batch in count_rows(partition):
            rows += rows_in_batch
            if rows >= left:
                return [*kept, replace(partition, cap=left)]
        if rows:
            kept.append(partition)
            left -= rows
    return kept


def relative_uri(manifest_uri: str, line: str) -> str:
    """A manifest line as a URI: absolute URIs and paths as written, relative paths next to the manifest."""
    if "://" in line or line.startswith("/"):
        return line
    folder = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    joined = f"{folder}/{line}"
    return joined if "://" in joined else os.path.normpath(joined)
