"""Output commit protocol: exactly-once predictions on storage without rename.

Layout under `output.uri`:
- `part-<run>-<seq>.parquet`  prediction shards (a run is one attempt);
- `_errors/part-<run>-<seq>.parquet`  dead letters of that shard (key, stage, error_type, message);
- `_shards/part-<run>-<seq>.json`  the shard's commit record, written *after* its data: a data file without
  one is an unfinished write and is never read;
- `_job.json`  which job the output belongs to (a fingerprint of model, input and output settings), so a
  retried or rerun attempt of the same job resumes instead of starting over;
- `_SUCCESS.json`  written last: counts and the list of shards in which every input key appears exactly
  once. When attempts overlapped, a shard that repeats keys is rewritten without them first.

Readers follow `_SUCCESS.json` (`read_committed`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchinfer_job import storage
from batchinfer_job.outputs import DEAD_LETTER_SCHEMA, PREDICTION_SCHEMA, dead_letters
from batchinfer_job.spec import BatchInferenceSpec

SUCCESS_FILE = "_SUCCESS.json"
JOB_FILE = "_job.json"
SHARDS_DIR = "_shards"
ERRORS_DIR = "_errors"


class OutputExistsError(FileExistsError):
    """The output cannot be used: it holds data (error_if_exists), foreign files, or is a file."""


_SHARD_NAME = r"part-[0-9a-f]+-\d+(-dedup-[0-9a-f]+)*"  # part-<run>-<seq>, then one -dedup-<run> per rewrite
_OWN_FILE = re.compile(
    rf"^(_SUCCESS\.json|_job\.json|{_SHARD_NAME}\.parquet|_shards/{_SHARD_NAME}\.json|_errors/{_SHARD_NAME}\.parquet)"
    rf"({re.escape(storage.IN_FLIGHT)}[0-9a-f]+)?$"
)


def is_own_file(relative: str) -> bool:
    """Whether a file (relative to output.uri) is one batchinfer writes: manifest, job record, shards,
    commit records, dead letters, or one of those still in flight. Only these are ever deleted."""
    return bool(_OWN_FILE.match(relative))


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int
    failed: int
    supersedes: str | None = None  # a shard rewritten without repeated keys replaces the original

    @property
    def name(self) -> str:
        return self.file.removesuffix(".parquet")


def job_fingerprint(spec: BatchInferenceSpec) -> str:
    """Identity of a job's output: the same fingerprint means a later attempt may resume it."""
    identity = {
        "model": spec.model.model_dump(mode="json"),
        "input": spec.input.model_dump(mode="json"),
        "output": spec.output.model_dump(mode="json", exclude={"mode"}),
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

    def committed_keys(self, shards: list[Shard]) -> set[str]:
        return {key for shard in shards for key in self.keys_of(shard)}

    def write_shard(self, name: str, table: pa.Table, supersedes: str | None = None) -> Shard:
        """Data, then dead letters, then the commit record: a crash in between leaves no committed shard."""
        table = table.cast(PREDICTION_SCHEMA)
        fs = self.location.arrow_fs
        pq.write_table(table, self.location.child(f"{name}.parquet").path, filesystem=fs)
        failed = table.num_rows - pc.sum(pc.is_null(table["error"])).as_py()
        if failed:
            self._ensure(ERRORS_DIR)
            pq.write_table(dead_letters(table), self.location.child(f"{ERRORS_DIR}/{name}.parquet").path, filesystem=fs)
        shard = Shard(file=f"{name}.parquet", rows=table.num_rows, failed=failed, supersedes=supersedes)
        self._ensure(SHARDS_DIR)
        storage.write_json(self.location.child(f"{SHARDS_DIR}/{name}.json"), asdict(shard))
        return shard

    def _ensure(self, folder: str) -> None:
        storage.ensure_folder(self.location.child(folder))

    def exactly_once(self, run_id: str) -> tuple[list[Shard], list[str]]:
        """Committed shards chosen so that each key appears once (overlapping shards rewritten without
        repeats), and the keys they hold, in order."""
        chosen: list[Shard] = []
        kept: list[str] = []
        seen: set[str] = set()
        for shard in self.committed_shards():
            keys = self.keys_of(shard)
            repeated = [k in seen for k in keys]
            if not any(repeated):
                chosen.append(shard)
                kept.extend(keys)
            elif not all(repeated):
                table = pq.read_table(self.location.child(shard.file).path, filesystem=self.location.arrow_fs)
                keep = pa.array([not r for r in repeated])
                rewritten = self.write_shard(f"{shard.name}-dedup-{run_id}", table.filter(keep), supersedes=shard.file)
                chosen.append(rewritten)
                kept.extend(k for k, r in zip(keys, repeated, strict=True) if not r)
            seen.update(keys)
        return chosen, kept

    def write_success(self, manifest: dict[str, Any]) -> None:
        storage.write_json(self.location.child(SUCCESS_FILE), manifest)


def shards_payload(shards: list[Shard]) -> list[dict[str, Any]]:
    return [asdict(s) for s in shards]


def read_committed(output_uri: str, columns: list[str] | None = None) -> pa.Table:
    """The predictions `_SUCCESS.json` lists: each input key exactly once."""
    location = storage.resolve(output_uri)
    manifest = storage.read_json(location.child(SUCCESS_FILE))
    tables = [
        pq.read_table(location.child(shard["file"]).path, columns=columns, filesystem=location.arrow_fs)
        for shard in manifest["shards"]
    ]
    schema = PREDICTION_SCHEMA if columns is None else pa.schema([PREDICTION_SCHEMA.field(c) for c in columns])
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_dead_letters(output_uri: str) -> pa.Table:
    """Every dead-letter row of the committed shards."""
    location = storage.resolve(output_uri)
    manifest = storage.read_json(location.child(SUCCESS_FILE))
    tables = []
    for shard in manifest["shards"]:
        path = location.child(f"{ERRORS_DIR}/{shard['file']}").path
        if shard["failed"]:
            tables.append(pq.read_table(path, filesystem=location.arrow_fs))
    return pa.concat_tables(tables) if tables else DEAD_LETTER_SCHEMA.empty_table()
