"""Driver ceiling: how many prediction rows per second the driver can take in and commit.

The driver's own work per row, as `pipeline.run_pipeline` does it, without Ray or a model: count labels, gather
batches into shards of `shardRows`, write each shard (Parquet, then its commit record) to the output store;
then the exactly-once pass over every committed shard. A node with 8 GPUs at 6,000 img/s needs 48,000 rows/s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batchinfer_job import commit, storage
from batchinfer_job.digest import key_digest
from batchinfer_job.outputs import PARTITION_COLUMN, prediction_table

TARGET_ROWS_PER_SECOND = 48_000  # 8 GPUs x 6,000 img/s
CATEGORIES = [f"class_{i}" for i in range(1000)]


@dataclass(frozen=True)
class CommitBenchResult:
    rows: int
    shards: int
    stream_seconds: float  # labels + shard writes
    finish_seconds: float  # the exactly-once pass

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.stream_seconds

    def lines(self, where: str) -> list[str]:
        ratio = self.rows_per_second / TARGET_ROWS_PER_SECOND
        return [
            f"driver commit ceiling ({where}): {self.rows:,} rows in {self.shards} shards",
            f"  streaming commit: {self.rows_per_second:,.0f} rows/s ({self.stream_seconds:.2f} s)",
            f"  exactly-once pass at the end: {self.finish_seconds:.2f} s",
            f"  vs 8 GPUs x 6,000 img/s = {TARGET_ROWS_PER_SECOND:,} rows/s: {ratio:.2f}x",
        ]


def batches(rows: int, batch: int, top_k: int = 5) -> Iterator:
    """Prediction tables as the model actors return them (keys as long as S3 object URIs)."""
    rng = np.random.default_rng(0)
    for start in range(0, rows, batch):
        count = min(batch, rows - start)
        keys = [
            f"s3://datasets/imagenet/train/n{(start + i) % 1000:08d}/img_{start + i:09d}.JPEG" for i in range(count)
        ]
        classes = rng.integers(0, 1000, size=(count, top_k), dtype=np.int32)
        scores = np.sort(rng.random((count, top_k), dtype=np.float32), axis=1)[:, ::-1]
        table = prediction_table(keys, [None] * count, classes, scores, CATEGORIES)
        # rows reach the driver in blocks read from one partition each: here a page of 1,024 inputs
        partitions = [f"s3://datasets/imagenet/train#files-{(start + i) // 1024}" for i in range(count)]
        yield table.append_column(PARTITION_COLUMN, pa.array(partitions, pa.string()))


def expected_partitions(tables: list[pa.Table]) -> dict[str, list]:
    """partition → [rows, digest hex] of the inputs, as the read tasks would report them."""
    keys: dict[str, list[str]] = defaultdict(list)
    for table in tables:
        for key, partition in zip(table["key"].to_pylist(), table[PARTITION_COLUMN].to_pylist(), strict=True):
            keys[partition].append(key)
    return {p: [len(k), f"{key_digest(k):016x}"] for p, k in keys.items()}


def run_commit_bench(output_uri: str, rows: int, shard_rows: int, batch: int) -> CommitBenchResult:
    prepared = list(batches(rows, batch))  # made before the clock starts: the driver receives them ready
    expected = expected_partitions(prepared)
    store = commit.OutputStore(storage.resolve(output_uri))
    store.prepare("overwrite", "commit-bench")
    run_id = uuid.uuid4().hex[:8]
    labels: Counter = Counter()
    pending, pending_rows, shards = [], 0, 0
    start = time.monotonic()
    for index, table in enumerate(prepared):
        labels.update(label for label in table["label"].to_pylist() if label is not None)
        pending.append(table)
        pending_rows += table.num_rows
        if pending_rows >= shard_rows or index == len(prepared) - 1:
            store.write_shard(f"part-{run_id}-{shards:09d}", pa.concat_tables(pending))
            pending, pending_rows, shards = [], 0, shards + 1
    streamed = time.monotonic()
    coverage = store.exactly_once(run_id, expected)  # raises unless every row is there exactly once
    finished = time.monotonic()
    if coverage.rows != rows:
        raise RuntimeError(f"committed {coverage.rows} rows of {rows}")
    return CommitBenchResult(rows, shards, streamed - start, finished - streamed)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 API server on 127.0.0.1, the AWS environment pointing at it while it runs; yields its endpoint.

    Set before Ray starts, the environment reaches Ray's workers too. The test suite's S3 fixture is this.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server with a bucket for the commit stage; yields the output URI."""
    import boto3

    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        yield "s3://bench/commit"
