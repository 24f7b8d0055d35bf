"""Output commit: prediction shards written one by one, then `_SUCCESS.json` last.

Readers follow `_SUCCESS.json` (or read `*.parquet`: pyarrow skips `_`-prefixed names). The manifest lists
every shard with its row counts, so it can be checked against the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchinfer_job import storage
from batchinfer_job.outputs import PREDICTION_SCHEMA

SUCCESS_FILE = "_SUCCESS.json"


class OutputExistsError(FileExistsError):
    """output.mode=error_if_exists and the output already holds data."""


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int
    failed: int


@dataclass
class ShardWriter:
    """Writes prediction tables as numbered Parquet shards under the output location."""

    output: storage.Location
    run_id: str
    shards: list[Shard] = field(default_factory=list)

    def write(self, table: pa.Table) -> Shard:
        name = f"part-{self.run_id}-{len(self.shards):05d}.parquet"
        pq.write_table(table.cast(PREDICTION_SCHEMA), self.output.child(name).path, filesystem=self.output.arrow_fs)
        shard = Shard(
            file=name, rows=table.num_rows, failed=table.num_rows - pc.sum(pc.is_null(table["error"])).as_py()
        )
        self.shards.append(shard)
        return shard


def prepare_output(output: storage.Location, mode: str) -> None:
    """Refuse or clear existing output before any work starts."""
    if storage.has_data(output):
        if mode != "overwrite":
            raise OutputExistsError(
                f"output.uri {output.uri!r} already holds data; set output.mode: overwrite to replace it, "
                "or choose another output.uri"
            )
        storage.remove_tree(output)
    storage.ensure_folder(output)


def write_success(output: storage.Location, manifest: dict) -> None:
    """Write the manifest; it comes last, after every shard."""
    storage.write_json(output.child(SUCCESS_FILE), manifest)


def shards_payload(shards: list[Shard]) -> list[dict]:
    return [asdict(s) for s in shards]
