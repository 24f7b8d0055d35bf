"""Input sources: list image files under a prefix, or rows of Parquet files, as a Ray Dataset.

Every row carries `key` (stable identity of the input) and either `uri` (to read) or `bytes`. Inputs are
listed (`list_inputs`) before anything is written or deleted, then opened (`open_source`) minus what an
earlier attempt already committed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from batchinfer_job import storage
from batchinfer_job.spec import InputSpec


class InputError(ValueError):
    """The inputs cannot be read as input.* describes."""


@dataclass
class InputTable:
    """Every input of the job (`key` + `uri` or `bytes`), and the files passed over, by reason."""

    table: pa.Table
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def all_keys(self) -> list[str]:
        return self.table["key"].to_pylist()


@dataclass
class InputSource:
    """The inputs still to process (`dataset`, `total`) and every input of the job (`all_keys`)."""

    dataset: ray.data.Dataset | None
    total: int
    all_keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def all_total(self) -> int:
        return len(self.all_keys)


def _image_table(spec: InputSpec) -> InputTable:
    location = storage.resolve(spec.uri)
    listing = storage.list_inputs(location, storage.IMAGE_SUFFIXES)
    paths = listing.paths if spec.limit is None else listing.paths[: spec.limit]
    uris = [location.uri_of(p) for p in paths]
    return InputTable(
        pa.table({"key": pa.array(uris, pa.string()), "uri": pa.array(uris, pa.string())}), listing.skipped
    )


def _parquet_table(spec: InputSpec) -> InputTable:
    location = storage.resolve(spec.uri)
    listing = storage.list_inputs(location, (".parquet",))
    if not listing.paths:
        raise InputError(f"input.uri {spec.uri!r} holds no .parquet files; check input.format")
    wanted = [c for c in (spec.keyColumn, spec.imageColumn, spec.pathColumn) if c]
    tables = []
    for path in listing.paths:
        schema = pq.read_schema(path, filesystem=location.arrow_fs)
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise InputError(
                f"input columns {missing} not in {location.uri_of(path)} (has {schema.names}); "
                "fix input.imageColumn/pathColumn/keyColumn"
            )
        table = pq.read_table(path, columns=wanted, filesystem=location.arrow_fs)
        if spec.keyColumn:
            keys = pc.cast(table[spec.keyColumn], pa.string())
        elif spec.pathColumn:
            keys = pc.cast(table[spec.pathColumn], pa.string())
        else:
            keys = pa.array([f"{location.uri_of(path)}#{i}" for i in range(table.num_rows)])
        body = table[spec.imageColumn] if spec.imageColumn else pc.cast(table[spec.pathColumn], pa.string())
        tables.append(pa.table({"key": keys, "bytes" if spec.imageColumn else "uri": body}))
    table = pa.concat_tables(tables)
    if spec.limit is not None:
        table = table.slice(0, spec.limit)
    return InputTable(table, listing.skipped)


def list_inputs(spec: InputSpec) -> InputTable:
    """Every input of the job; InputError when there are none or keys repeat."""
    inputs = _image_table(spec) if spec.format == "images" else _parquet_table(spec)
    if inputs.table.num_rows == 0:
        skipped = "; ".join(f"{n} {reason}" for reason, n in inputs.skipped.items())
        raise InputError(
            f"input.uri {spec.uri!r} holds no inputs of format {spec.format!r}"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    keys = inputs.all_keys
    duplicates = len(keys) - len(set(keys))
    if duplicates:
        raise InputError(f"{duplicates} duplicate input keys; give input.keyColumn a unique column")
    return inputs


def open_source(inputs: InputTable, rows_per_block: int, skip: set[str] | None = None) -> InputSource:
    """The input rows not in `skip` as a Ray Dataset of `rows_per_block`-row blocks.

    One model batch per block: Ray Data hands a block's results downstream together, so small blocks let
    predictions stream back (and commit, and show progress) batch by batch.
    """
    table, keys = inputs.table, inputs.all_keys
    if skip:
        table = table.filter(pa.array([key not in skip for key in keys]))
    if table.num_rows == 0:
        return InputSource(dataset=None, total=0, all_keys=keys, skipped=inputs.skipped)
    blocks = math.ceil(table.num_rows / rows_per_block)
    dataset = ray.data.from_arrow([table.slice(i * rows_per_block, rows_per_block) for i in range(blocks)])
    return InputSource(dataset=dataset, total=table.num_rows, all_keys=keys, skipped=inputs.skipped)
