"""Read tasks: one partition (see `inputs`) becomes input rows, on a worker, never on the driver.

Rows carry `key` (the input's identity), `partition` and either `uri` (to read in decode) or `bytes`; a row that
cannot become an input (a manifest line naming a URI batchinfer may not read) carries `error` instead.
What a read task found — rows, a digest of its keys, files passed over — goes to the job's `PartitionLedger`
actor once the partition is read; the driver uses it for progress and for the exactly-once check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from batchinfer_job import storage
from batchinfer_job.digest import add_digests, key_digest
from batchinfer_job.inputs import InputError, Partition, check_parquet_columns, relative_uri, wanted_columns
from batchinfer_job.spec import InputSpec, check_storage_uri, within_prefixes

READ_ROWS = 1024  # rows per table a read task yields (Ray Data re-blocks them to model batches)
# Parquet: the cells a read task holds at once (about: batches are sized from each row group's average cell), and how
# much an image or path column may expand from its compressed size before it is refused unread. Encoded images
# barely compress; a 29 KB file that held 943 MB of cells took a read task past 6 GB before any size check ran.
PARQUET_BATCH_BYTES = 256 * 2**20
PARQUET_MAX_EXPANSION = 20


@dataclass
class PartitionRead:
    """What reading one partition found."""

    rows: int = 0
    digest: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def as_record(self) -> list[Any]:
        return [self.rows, f"{self.digest:016x}"]


def _table(keys: list[str], body: pa.Array | list, column: str, errors: list[str | None] | None = None) -> pa.Table:
    table = pa.table({"key": pa.array(keys, pa.string()), column: body})
    return table if errors is None else table.append_column("error", pa.array(errors, pa.string()))


def _image_tables(partition: Partition, found: PartitionRead) -> Iterator[pa.Table]:
    if partition.kind == "files":
        uris = list(partition.names)
    else:
        location = storage.resolve(partition.uri)
        listing = storage.list_inputs(location, storage.IMAGE_SUFFIXES, top_level=False)
        found.skipped = listing.skipped
        uris = [location.uri_of(p) for p in listing.paths]
    for i in range(0, len(uris), READ_ROWS):
        named = [_utf8_name(uri) for uri in uris[i : i + READ_ROWS]]
        keys, errors = [key for key, _ in named], [error for _, error in named]
        readable = [None if error else key for key, error in named]
        yield _table(keys, pa.array(readable, pa.string()), "uri", errors)


def _utf8_name(uri: str) -> tuple[str, str | None]:
    """(key, error) for a listed file: a name that is not UTF-8 (held as surrogates, e.g. `caf\\xe9.jpg`) is an
    error row under a readable key rather than a failed partition."""
    try:
        uri.encode("utf-8")
        return uri, None
    except UnicodeEncodeError:
        shown = uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return shown, "read: the file name is not valid UTF-8; rename the file (UTF-8) to predict it"


def _row_keys(uri: str, offset: int, values: list[str | None]) -> list[str]:
    """Each row's key: its key column's value, else `file#row` (the row's place in the file)."""
    return [value if value is not None else f"{uri}#{offset + i}" for i, value in enumerate(values)]


def _parquet_keys(batch: pa.RecordBatch, spec: InputSpec, uri: str, offset: int) -> tuple[list[str], list[str | None]]:
    """Each row's key and, for a row whose key or path column is null, its error (the key is then `file#row`)."""
    column = spec.keyColumn or spec.pathColumn
    if column is None:
        return _row_keys(uri, offset, [None] * batch.num_rows), [None] * batch.num_rows
    field = "input.keyColumn" if spec.keyColumn else "input.pathColumn"
    values = pc.cast(batch.column(column), pa.string()).to_pylist()
    keys = _row_keys(uri, offset, values)
    errors = [None if value is not None else f"read: {field} {column!r} is null in this row" for value in values]
    return keys, errors


def _parquet_tables(partition: Partition, spec: InputSpec) -> Iterator[pa.Table]:
    """A Parquet file's rows, row group by row group, in batches of about PARQUET_BATCH_BYTES of cells; a row group
    whose image (or path) column is over input.maxImageBytes and expands more than PARQUET_MAX_EXPANSION times is
    not read: its rows become error rows, from the file's metadata and its key column alone."""
    location = storage.resolve(partition.uri)
    body = spec.imageColumn or spec.pathColumn
    if body is None:  # the schema refuses Parquet input without either; said here for the type checker
        raise InputError("input.format parquet needs input.imageColumn or input.pathColumn")
    with location.fs.open(location.path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        check_parquet_columns(spec, partition.uri, parquet.schema_arrow)
        offset = 0
        for group in range(parquet.metadata.num_row_groups):
            meta = parquet.metadata.row_group(group)
            chunk = next(meta.column(j) for j in range(meta.num_columns) if meta.column(j).path_in_schema == body)
            refusal = _expansion_refusal(chunk, body, spec)
            if refusal is not None:
                yield _refused_rows(parquet, group, spec, partition.uri, offset, refusal)
                offset += meta.num_rows
                continue
            cell = max(1, chunk.total_uncompressed_size // max(meta.num_rows, 1))
            rows = max(1, min(READ_ROWS, PARQUET_BATCH_BYTES // cell))
            for batch in parquet.iter_batches(batch_size=rows, row_groups=[group], columns=wanted_columns(spec)):
                yield _parquet_table(batch, spec, partition.uri, offset)
                offset += batch.num_rows


def _parquet_table(batch: pa.RecordBatch, spec: InputSpec, uri: str, offset: int) -> pa.Table:
    keys, key_errors = _parquet_keys(batch, spec, uri, offset)
    if spec.imageColumn:
        return _table(keys, batch.column(spec.imageColumn), "bytes", key_errors)
    resolved = [listed_uri(uri, p) for p in pc.cast(batch.column(spec.pathColumn), pa.string())]
    uris = [uri for uri, _ in resolved]
    errors = [key_error or error for key_error, (_, error) in zip(key_errors, resolved, strict=True)]
    return _table(keys, pa.array(uris, pa.string()), "uri", errors)


def _expansion_refusal(chunk: pq.ColumnChunkMetaData, column: str, spec: InputSpec) -> str | None:
    """Why a row group's image/path column chunk is refused unread, or None: its cells together are larger than
    input.maxImageBytes and expand more than PARQUET_MAX_EXPANSION times (encoded images do not)."""
    packed, cells = chunk.total_compressed_size, chunk.total_uncompressed_size
    if cells <= spec.maxImageBytes or cells <= PARQUET_MAX_EXPANSION * packed:
        return None
    field = "input.imageColumn" if spec.imageColumn else "input.pathColumn"
    return (
        f"read: {field} {column!r} of this row group expands {cells / max(packed, 1):,.0f}x ({packed:,} bytes "
        f"stored, {cells:,} bytes of cells): not encoded images; refused unread (store JPEG/PNG/WebP bytes)"
    )


def _refused_rows(parquet: pq.ParquetFile, group: int, spec: InputSpec, uri: str, offset: int, error: str) -> pa.Table:
    """A refused row group as error rows: keys from input.keyColumn (read alone), else `file#row`."""
    rows = parquet.metadata.row_group(group).num_rows
    values: list[str | None] = [None] * rows
    if spec.keyColumn:
        values = pc.cast(parquet.read_row_group(group, columns=[spec.keyColumn]).column(0), pa.string()).to_pylist()
    keys = _row_keys(uri, offset, values)
    body, kind = (pa.nulls(rows, pa.binary()), "bytes") if spec.imageColumn else (pa.nulls(rows, pa.string()), "uri")
    return _table(keys, body, kind, [error] * rows)


def manifest_lines(partition: Partition) -> Iterator[str]:
    """The lines of a manifest byte range: a line belongs to the range it starts in (a range that does not
    start at 0 skips the partial line it starts inside; every range finishes the line it ends inside)."""
    location = storage.resolve(partition.uri)
    with location.fs.open(location.path, "rb") as handle:
        handle.seek(max(partition.start - 1, 0))
        if partition.start > 0 and handle.read(1) != b"\n":
            handle.readline()  # the rest of a line that the previous range owns
        while handle.tell() < partition.end or (partition.end == 0 and partition.start == 0):
            line = handle.readline()
            if not line:
                return
            yield line.decode("utf-8", errors="replace").strip()


def _manifest_tables(partition: Partition, spec: InputSpec) -> Iterator[pa.Table]:
    field_name = spec.pathColumn or "uri"
    json_lines = partition.uri.lower().endswith(".jsonl")
    keys: list[str] = []
    uris: list[str | None] = []
    errors: list[str | None] = []
    for number, line in enumerate(manifest_lines(partition)):
        if not line:
            continue
        key, uri, error = _manifest_entry(partition, line, json_lines, field_name, number)
        keys.append(key)
        uris.append(uri)
        errors.append(error)
        if len(keys) == READ_ROWS:
            yield _table(keys, pa.array(uris, pa.string()), "uri", errors)
            keys, uris, errors = [], [], []
    if keys:
        yield _table(keys, pa.array(uris, pa.string()), "uri", errors)


def _manifest_entry(
    partition: Partition, line: str, json_lines: bool, field_name: str, number: int
) -> tuple[str, str | None, str | None]:
    """(key, uri to read, error): a line batchinfer cannot or may not read becomes an error row, never a skip."""
    if json_lines:
        try:
            value = json.loads(line).get(field_name)
        except (ValueError, AttributeError) as err:
            return f"{partition.id}:{number}", None, f"read: ManifestError: not a JSON object ({err})"
        if not isinstance(value, str) or not value:
            return f"{partition.id}:{number}", None, f"read: ManifestError: no string field {field_name!r}"
        line = value
    return (line, *listed_uri(partition.uri, line))


def listed_uri(listing_uri: str, value: pa.Scalar | str) -> tuple[str | None, str | None]:
    """(uri to read, error) for a path listed in a manifest or a Parquet path column: relative to the file that
    lists it, held to the spec's URI grammar (no other schemes, no `::` chains)."""
    text = value.as_py() if isinstance(value, pa.Scalar) else value
    if not text:
        return None, "read: InvalidPathError: empty path"
    try:
        return check_storage_uri(relative_uri(listing_uri, text), "listed path"), None
    except ValueError as err:
        return None, f"read: InvalidPathError: {err}"


def partition_tables(partition: Partition, spec: InputSpec, found: PartitionRead) -> Iterator[pa.Table]:
    """The rows of a partition, in order (at most `cap`); a folder's listing puts what it passed over in `found`."""
    if partition.kind in ("files", "prefix"):
        tables = _image_tables(partition, found)
    elif partition.kind == "parquet":
        tables = _parquet_tables(partition, spec)
    else:
        tables = _manifest_tables(partition, spec)
    return _capped(tables, partition.cap)


def _capped(tables: Iterator[pa.Table], cap: int | None) -> Iterator[pa.Table]:
    left = cap
    for table in tables:
        if left is not None:
            table = table.slice(0, left)
            left -= table.num_rows
        if table.num_rows:
            yield table
        if left == 0:
            return


def count_rows(partition: Partition, spec: InputSpec) -> Iterator[int]:
    """Rows of a partition, batch by batch (input.limit uses it on the driver to place the limit)."""
    for table in partition_tables(partition, spec, PartitionRead()):
        yield table.num_rows


def _unique_keys_advice(partition: Partition) -> str:
    checked = "keys must be unique; they are checked within each partition"
    if partition.kind == "manifest":
        return f"list each input once (a manifest row's key is its URI; {checked}: a byte range of one manifest)"
    if partition.kind == "parquet":
        return f"give input.keyColumn a unique column ({checked}: one Parquet file)"
    return f"{checked} (one folder)"


OUTSIDE_PREFIXES = "read: outside the input prefixes this job may read (input.allowedPrefixes)"


def _held_to_prefixes(table: pa.Table, prefixes: list[str]) -> pa.Table:
    """Rows whose URI lies outside `prefixes` (after resolving local symlinks) become error rows with one fixed
    message, which says nothing of whether the object exists; their URI is never read."""
    uris = table["uri"].to_pylist()
    errors = table["error"].to_pylist() if "error" in table.column_names else [None] * len(uris)
    outside = [
        uri is not None and not error and not within_prefixes(uri, prefixes)
        for uri, error in zip(uris, errors, strict=True)
    ]
    if not any(outside):
        return table
    uris = [None if out else uri for uri, out in zip(uris, outside, strict=True)]
    errors = [OUTSIDE_PREFIXES if out else error for error, out in zip(errors, outside, strict=True)]
    table = table.set_column(table.column_names.index("uri"), "uri", pa.array(uris, pa.string()))
    if "error" in table.column_names:
        return table.set_column(table.column_names.index("error"), "error", pa.array(errors, pa.string()))
    return table.append_column("error", pa.array(errors, pa.string()))


def read_partition(partition: Partition, spec: InputSpec, done: set[str], found: PartitionRead) -> Iterator[pa.Table]:
    """Rows of a partition not in `done` (its keys committed by earlier attempts), with a `partition` column.

    Fills in `found` as it goes (every row, done ones included); InputError for repeated keys.
    """
    seen: set[str] = set()
    for table in partition_tables(partition, spec, found):
        keys = table["key"].to_pylist()
        seen.update(keys)
        found.rows += len(keys)
        found.digest = add_digests(found.digest, key_digest(keys))
        if len(seen) != found.rows:
            raise InputError(
                f"{partition.id}: {found.rows - len(seen)} duplicate input keys; {_unique_keys_advice(partition)}"
            )
        if done:
            table = table.filter(pa.array([k not in done for k in keys]))
        if spec.allowedPrefixes is not None and "uri" in table.column_names:
            table = _held_to_prefixes(table, spec.allowedPrefixes)
        if table.num_rows:
            yield table.append_column("partition", pa.array([partition.id] * table.num_rows, pa.string()))


@ray.remote(num_cpus=0)
class PartitionLedger:
    """The job's record of partitions read so far (rows, digest, skipped files), of read failures, and of what
    the later stages finished."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.read: dict[str, tuple[list[Any], dict[str, int]]] = {}
        self.problems: list[str] = []
        self.ticks: dict[str, int] = {}  # what the stages finished: rows read and decoded, actors started/ready

    def tick(self, stage: str, count: int = 1) -> None:
        self.ticks[stage] = self.ticks.get(stage, 0) + count

    def progress(self) -> dict[str, int]:
        """Every stage's ticks (for a stall's diagnosis: `stall.StageProgress`)."""
        return dict(self.ticks)

    def record(self, partition_id: str, record: list[Any], skipped: dict[str, int]) -> None:
        if partition_id not in self.read:  # a retried task reports the same partition again
            self.order.append(partition_id)
            self.read[partition_id] = (record, skipped)

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def since(self, seen: int) -> tuple[list[tuple[str, list[Any], dict[str, int]]], list[str]]:
        """Partitions recorded after the first `seen` ones (the driver asks for news only), and every problem."""
        return [(p, *self.read[p]) for p in self.order[seen:]], list(self.problems)


def read_partitions(
    batch: dict[str, np.ndarray], *, spec: InputSpec, ledger: Any, done: dict[str, list[list[Any]]]
) -> Iterator[pa.Table]:
    """Ray Data UDF over the plan (one partition per batch): the partition's rows, then its ledger record.

    A partition that cannot be read is reported to the ledger (the driver fails the job with the message) and
    yields nothing more; read errors of single rows are decode's business, not this task's.
    """
    for row in _rows(batch):
        partition = Partition.from_row(row)
        found = PartitionRead()
        try:
            committed = committed_keys(done.get(partition.id, []))
            for table in read_partition(partition, spec, committed, found):
                yield table
                ledger.tick.remote("read", table.num_rows)  # not awaited: no cost on the hot path
        except (InputError, OSError, ValueError, storage.StorageError, pa.ArrowException) as err:
            ray.get(ledger.problem.remote(f"input partition {partition.id}: {type(err).__name__}: {err}"))
            continue
        ray.get(ledger.record.remote(partition.id, found.as_record(), found.skipped))


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    for i in range(len(batch["id"])):
        yield {name: column[i] for name, column in batch.items()}


def committed_keys(spans: list[list[Any]]) -> set[str]:
    """Keys of a partition that earlier attempts committed: `[shard uri, first row, rows]` spans of shards."""
    keys: set[str] = set()
    columns: dict[str, pa.ChunkedArray] = {}
    for shard_uri, first, rows in spans:
        if shard_uri not in columns:
            location = storage.resolve(str(shard_uri))
            columns[shard_uri] = pq.read_table(location.path, columns=["key"], filesystem=location.arrow_fs)["key"]
        keys.update(columns[shard_uri].slice(int(first), int(rows)).to_pylist())
    return keys
