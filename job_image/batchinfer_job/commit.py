"""Output commit protocol: exactly-once predictions on storage without rename.

Layout under `output.uri`:
- `part-<run>-<seq>.parquet`  prediction shards (a run is one attempt);
- `_errors/part-<run>-<seq>.parquet`  dead letters of that shard (key, stage, error_type, message);
- `_shards/part-<run>-<seq>.json`  the shard's commit record, written *after* its data: a data file without
  one is an unfinished write and is never read. It says which input partition each row came from (`runs`: the
  shard's rows in order as [partition, rows] runs), each partition's rows and key digest in it (`partitions`),
  and the partitions whose reading had finished by then, with their full rows and digest (`listed`);
- `_job.json`  which job the output belongs to (a fingerprint of model, input and output settings), so a
  retried or rerun attempt of the same job resumes instead of starting over;
- `_SUCCESS.json`  written last: counts, the list of shards, and per input partition its rows and key digest,
  equal to what was read: every input exactly once, proved per partition without gathering keys. When attempts
  overlapped (a partition holds more rows than it has), the shards holding its repeats are rewritten without them.

Readers follow `_SUCCESS.json` (`read_committed`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchinfer_job import storage
from batchinfer_job.digest import add_digests, key_digest
from batchinfer_job.outputs import DEAD_LETTER_SCHEMA, PARTITION_COLUMN, PREDICTION_SCHEMA, dead_letters
from batchinfer_job.spec import BatchInferenceSpec

SUCCESS_FILE = "_SUCCESS.json"
JOB_FILE = "_job.json"
SHARDS_DIR = "_shards"
ERRORS_DIR = "_errors"


class OutputExistsError(FileExistsError):
    """The output cannot be used: it holds data (error_if_exists), foreign files, or is a file."""


class OutputWriteError(storage.StorageError):
    """Writing to output.uri failed where it is written (no such bucket, no permission, a full disk)."""


@contextmanager
def writing(location: storage.Location, what: str) -> Iterator[None]:
    """Turn a failed write to the output into one line naming output.uri, what was written and what to check;
    the output's own refusals (OutputExistsError) pass unchanged."""
    try:
        yield
    except OutputExistsError:
        raise
    except storage.WRITE_ERRORS as err:
        raise OutputWriteError(
            f"output.uri {location.uri!r}: {what} failed: {type(err).__name__}: {err}; check the bucket or folder "
            "name, write permission, credentials and free space (shards committed so far are kept: a rerun "
            "resumes)"
        ) from err


_SHARD_NAME = r"part-[0-9a-f]+-\d+(-dedup-[0-9a-f]+)*"  # part-<run>-<seq>, then one -dedup-<run> per rewrite
_OWN_FILE = re.compile(
    rf"^(_SUCCESS\.json|_job\.json|{_SHARD_NAME}\.parquet|_shards/{_SHARD_NAME}\.json|_errors/{_SHARD_NAME}\.parquet)"
    rf"({re.escape(storage.IN_FLIGHT)}[0-9a-f]+)?$"
)


def is_own_file(relative: str) -> bool:
    """Whether a file (relative to output.uri) is one batchinfer writes: manifest, job record, shards,
    commit records, dead letters, or one of those still in flight. Only these are ever deleted."""
    return bool(_OWN_FILE.match(relative))


LAYOUT = 2  # 2: commit records carry partitions; outputs of layout 1 are not resumed (a new job fingerprint)


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int
    failed: int
    supersedes: str | None = None  # a shard rewritten without repeated keys replaces the original
    runs: list[list[Any]] = field(default_factory=list)  # [partition, rows] in row order
    partitions: dict[str, list[Any]] = field(default_factory=dict)  # partition → [rows, digest hex]
    listed: dict[str, list[Any]] = field(default_factory=dict)  # partitions fully read by then → [rows, digest]

    @property
    def name(self) -> str:
        return self.file.removesuffix(".parquet")

    def as_record(self) -> dict[str, Any]:
        """The commit record (a shallow dict: `asdict` would deep-copy every run)."""
        return {f: getattr(self, f) for f in ("file", "rows", "failed", "supersedes", "runs", "partitions", "listed")}

    def spans(self) -> Iterator[tuple[str, int, int]]:
        """(partition, first row, rows) of each run."""
        first = 0
        for partition, rows in self.runs:
            yield partition, first, rows
            first += rows


def _runs(partitions: list[str]) -> list[list[Any]]:
    runs: list[list[Any]] = []
    for partition in partitions:
        if runs and runs[-1][0] == partition:
            runs[-1][1] += 1
        else:
            runs.append([partition, 1])
    return runs


def partition_stats(keys: list[str], runs: list[list[Any]]) -> dict[str, list[Any]]:
    """Per partition: rows and the digest of its keys, from a shard's keys and runs."""
    rows: dict[str, int] = defaultdict(int)
    digests: dict[str, int] = defaultdict(int)
    first = 0
    for partition, count in runs:
        rows[partition] += count
        digests[partition] = add_digests(digests[partition], key_digest(keys[first : first + count]))
        first += count
    return {p: [rows[p], f"{digests[p]:016x}"] for p in rows}


def job_fingerprint(spec: BatchInferenceSpec) -> str:
    """Identity of a job's output: the same fingerprint means a later attempt may resume it."""
    identity = {
        "model": spec.model.model_dump(mode="json"),
        "input": spec.input.model_dump(mode="json"),
        "output": spec.output.model_dump(mode="json", exclude={"mode"}),
        "layout": LAYOUT,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class OutputStore:
    """One output location and the commit protocol on it."""

    location: storage.Location

    def _exists(self, name: str) -> bool:
        return self.location.fs.exists(self.location.child(name).path)

    def prepare(self, mode: str, fingerprint: str) -> list[Shard]:
        """Get the output ready; returns shards already committed by earlier attempts of this job.

        A finished output (`_SUCCESS.json`) or another job's output is refused (error_if_exists) or has
        batchinfer's own files removed (overwrite); an unfinished output of the same job is resumed in either
        mode. Files batchinfer did not write are never deleted: their presence refuses the job in both modes.
        """
        if self.location.fs.isfile(self.location.path):
            raise OutputExistsError(
                f"output.uri {self.location.uri!r} is an existing file; give a folder or prefix of its own"
            )
        if self._resumable(fingerprint):
            return self.committed_shards()
        if storage.has_data(self.location):
            if self._resumable(fingerprint):  # another attempt of this job started in between
                return self.committed_shards()
            files = storage.files_under(self.location)
            foreign = [f for f in files if not is_own_file(f)]
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise OutputExistsError(
                    f"output.uri {self.location.uri!r} holds files batchinfer did not write ({shown}); "
                    "nothing was deleted. Move them away or choose another output.uri (output.mode: overwrite "
                    "removes only batchinfer's own output)"
                )
            if mode != "overwrite":
                raise OutputExistsError(
                    f"output.uri {self.location.uri!r} already holds batchinfer output; set output.mode: "
                    "overwrite to replace it, or choose another output.uri"
                )
            storage.remove_files(self.location, [f for f in files if storage.IN_FLIGHT not in f])
        storage.ensure_folder(self.location)
        storage.write_json(self.location.child(JOB_FILE), {"fingerprint": fingerprint})
        return []

    def _resumable(self, fingerprint: str) -> bool:
        """An unfinished output of this very job (same fingerprint, no `_SUCCESS.json`)."""
        if self._exists(SUCCESS_FILE) or not self._exists(JOB_FILE):
            return False
        return storage.read_json(self.location.child(JOB_FILE)).get("fingerprint") == fingerprint

    def committed_shards(self) -> list[Shard]:
        """Every shard with a commit record, sorted by name (attempt, then sequence)."""
        folder = self.location.child(SHARDS_DIR)
        if not self.location.fs.exists(folder.path):
            return []
        records = sorted(p for p in self.location.fs.find(folder.path) if p.endswith(".json"))
        shards = []
        for path in records:
            with self.location.fs.open(path, "rb") as handle:
                shards.append(Shard(**json.loads(handle.read())))
        replaced = {s.supersedes for s in shards if s.supersedes}
        return [s for s in shards if s.file not in replaced]

    def keys_of(self, shard: Shard) -> list[str]:
        table = pq.read_table(self.location.child(shard.file).path, columns=["key"], filesystem=self.location.arrow_fs)
        return table["key"].to_pylist()

    def write_shard(
        self, name: str, table: pa.Table, supersedes: str | None = None, listed: dict[str, list[Any]] | None = None
    ) -> Shard:
        """Data, then dead letters, then the commit record: a crash in between leaves no committed shard.

        `table` carries the `partition` column (kept in the record as runs, not written to the shard).
        """
        partitions = table[PARTITION_COLUMN].to_pylist()
        table = table.drop_columns([PARTITION_COLUMN]).cast(PREDICTION_SCHEMA)
        written = [
            self.location.child(f"{name}.parquet").path,
            self.location.child(f"{ERRORS_DIR}/{name}.parquet").path,
        ]
        try:
            return self._write_shard(name, table, partitions, supersedes, listed)
        except BaseException:
            storage.remove_leftovers(self.location.fs, written)  # an uncommitted shard is never left behind
            raise

    def _write_shard(
        self,
        name: str,
        table: pa.Table,
        partitions: list[str],
        supersedes: str | None,
        listed: dict[str, list[Any]] | None,
    ) -> Shard:
        fs = self.location.arrow_fs
        pq.write_table(table, self.location.child(f"{name}.parquet").path, filesystem=fs)
        failed = table.num_rows - pc.sum(pc.is_null(table["error"])).as_py()
        if failed:
            self._ensure(ERRORS_DIR)
            pq.write_table(dead_letters(table), self.location.child(f"{ERRORS_DIR}/{name}.parquet").path, filesystem=fs)
        runs = _runs(partitions)
        shard = Shard(
            file=f"{name}.parquet",
            rows=table.num_rows,
            failed=failed,
            supersedes=supersedes,
            runs=runs,
            partitions=partition_stats(table["key"].to_pylist(), runs),
            listed=listed or {},
        )
        self._ensure(SHARDS_DIR)
        storage.write_json(self.location.child(f"{SHARDS_DIR}/{name}.json"), shard.as_record())
        return shard

    def _ensure(self, folder: str) -> None:
        storage.ensure_folder(self.location.child(folder))

    def _table_with_partitions(self, shard: Shard) -> pa.Table:
        table = pq.read_table(self.location.child(shard.file).path, filesystem=self.location.arrow_fs)
        partitions = [p for p, rows in shard.runs for _ in range(rows)]
        return table.append_column(PARTITION_COLUMN, pa.array(partitions, pa.string()))

    def exactly_once(self, run_id: str, expected: dict[str, list[Any]]) -> Coverage:
        """Committed shards chosen so that each partition holds each of its keys once, checked against
        `expected` (partition → [rows, digest] as read).

        Only partitions holding more rows than they have (attempts that overlapped) cost key reads: the shards
        holding their rows are rewritten without repeats, keeping a set of those partitions' keys only.
        """
        shards = self.committed_shards()
        coverage = Coverage.of(shards)
        over = {p for p, (rows, _) in coverage.committed.items() if p in expected and rows > expected[p][0]}
        if over:
            shards = self._without_repeats(shards, over, run_id)
            coverage = Coverage.of(shards)
        coverage.check(expected)
        return coverage

    def _without_repeats(self, shards: list[Shard], over: set[str], run_id: str) -> list[Shard]:
        seen: dict[str, set[str]] = defaultdict(set)
        chosen: list[Shard] = []
        for shard in shards:
            if not over.intersection(shard.partitions):
                chosen.append(shard)
                continue
            keys = self.keys_of(shard)
            keep = []
            for partition, first, rows in shard.spans():
                for key in keys[first : first + rows]:
                    repeat = partition in over and key in seen[partition]
                    keep.append(not repeat)
                    if partition in over:
                        seen[partition].add(key)
            if all(keep):
                chosen.append(shard)
            elif any(keep):
                table = self._table_with_partitions(shard).filter(pa.array(keep))
                name = f"{shard.name}-dedup-{run_id}"
                chosen.append(self.write_shard(name, table, supersedes=shard.file, listed=shard.listed))
        return chosen

    def write_success(self, manifest: dict[str, Any]) -> None:
        storage.write_json(self.location.child(SUCCESS_FILE), manifest)


class CoverageError(RuntimeError):
    """The committed output does not hold every input exactly once."""


@dataclass
class Coverage:
    """Committed shards and, per input partition, the rows and key digest they hold."""

    shards: list[Shard]
    committed: dict[str, list[Any]]  # partition → [rows, digest int]

    @classmethod
    def of(cls, shards: list[Shard]) -> Coverage:
        committed: dict[str, list[Any]] = {}
        for shard in shards:
            for partition, (rows, digest) in shard.partitions.items():
                before = committed.get(partition, [0, 0])
                committed[partition] = [before[0] + rows, add_digests(before[1], int(digest, 16))]
        return cls(shards, committed)

    def check(self, expected: dict[str, list[Any]]) -> None:
        """CoverageError unless every partition holds exactly the rows and digest it was read with."""
        wrong = []
        for partition, (rows, digest) in expected.items():
            got_rows, got_digest = self.committed.get(partition, [0, 0])
            if got_rows != rows or got_digest != int(digest, 16):
                wrong.append(f"{partition} ({got_rows} of {rows} rows" + (")" if got_rows != rows else ", other keys)"))
        foreign = sorted(set(self.committed) - set(expected))
        problems = []
        if wrong:
            shown = "; ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            problems.append(f"{len(wrong)} partitions differ from what was read: {shown}")
        if foreign:
            problems.append(f"rows of partitions no longer among the inputs: {foreign[:3]}")
        if problems:
            raise CoverageError(
                f"committed output does not cover the inputs exactly once: {'; '.join(problems)}; rerun to resume"
            )

    def spans(self) -> dict[str, list[list[Any]]]:
        """Per partition, where its committed rows are: [shard file, first row, rows] spans."""
        spans: dict[str, list[list[Any]]] = defaultdict(list)
        for shard in self.shards:
            for partition, first, rows in shard.spans():
                spans[partition].append([shard.file, first, rows])
        return spans

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.shards)


def listed_partitions(shards: list[Shard]) -> dict[str, list[Any]]:
    """Every partition an attempt finished reading, as its commit records say: partition → [rows, digest]."""
    listed: dict[str, list[Any]] = {}
    for shard in shards:
        listed.update(shard.listed)
    return listed


def shards_payload(shards: list[Shard]) -> list[dict[str, Any]]:
    """What `_SUCCESS.json` lists per shard (the per-partition detail stays in the commit records)."""
    return [{"file": s.file, "rows": s.rows, "failed": s.failed, "supersedes": s.supersedes} for s in shards]


class NotCommittedError(FileNotFoundError):
    """An output location holds no `_SUCCESS.json`: no job has finished writing there."""


def read_success(output_uri: str) -> dict[str, Any]:
    """The commit record of a finished output (counts, shards, partitions)."""
    location = storage.resolve(output_uri)
    try:
        return storage.read_json(location.child(SUCCESS_FILE))
    except FileNotFoundError:
        raise NotCommittedError(
            f"{output_uri} holds no {SUCCESS_FILE}: no job has finished writing there (still running, failed, "
            "or another output.uri)"
        ) from None


def read_committed(output_uri: str, columns: list[str] | None = None) -> pa.Table:
    """The predictions `_SUCCESS.json` lists: each input key exactly once."""
    location = storage.resolve(output_uri)
    manifest = read_success(output_uri)
    tables = [
        pq.read_table(location.child(shard["file"]).path, columns=columns, filesystem=location.arrow_fs)
        for shard in manifest["shards"]
    ]
    schema = PREDICTION_SCHEMA if columns is None else pa.schema([PREDICTION_SCHEMA.field(c) for c in columns])
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_dead_letters(output_uri: str) -> pa.Table:
    """Every dead-letter row of the committed shards."""
    location = storage.resolve(output_uri)
    manifest = read_success(output_uri)
    tables = []
    for shard in manifest["shards"]:
        path = location.child(f"{ERRORS_DIR}/{shard['file']}").path
        if shard["failed"]:
            tables.append(pq.read_table(path, filesystem=location.arrow_fs))
    return pa.concat_tables(tables) if tables else DEAD_LETTER_SCHEMA.empty_table()
