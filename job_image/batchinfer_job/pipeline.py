"""The inference pipeline: inputs → decode (CPU tasks) → predict (actor pool) → shards → `_SUCCESS.json`.

Predictions stream back to the driver, which writes them as shards: rows are small (a key, classes,
scores), so the driver sees every row once, counts progress exactly, and commits output in order.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import ray.data

from batchinfer_job import commit, inputs, storage
from batchinfer_job.decode import decode_batch
from batchinfer_job.models import preprocess_for
from batchinfer_job.predictor import PredictorConfig, TorchPredictor
from batchinfer_job.progress import ProgressReport
from batchinfer_job.spec import BatchInferenceSpec

SHARD_ROWS = 1024
SHARD_SECONDS = 20.0
DECODE_TASK_RETRIES = 3


@dataclass
class RunResult:
    total: int
    succeeded: int
    failed: int
    seconds: float
    output_uri: str
    manifest: dict
    label_counts: Counter = field(default_factory=Counter)

    @property
    def rows_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0


def default_batch_size(spec: BatchInferenceSpec) -> int:
    if spec.batching.batchSize:
        return spec.batching.batchSize
    return 64 if spec.compute.gpusPerActor > 0 else 16


def build_dataset(spec: BatchInferenceSpec, source: inputs.InputSource) -> ray.data.Dataset:
    """The lazy Ray Data plan: decode on CPU tasks, predict on the actor pool."""
    compute = spec.compute
    batch_size = default_batch_size(spec)
    decoded = source.dataset.map_batches(
        decode_batch,
        fn_kwargs={"preprocess": preprocess_for(spec.model)},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=compute.preprocessCpus,
        # Decode is idempotent: retry a lost task a bounded number of times. Remote args that differ from
        # the actor's also keep Ray from fusing decode into the model actor, so decode runs in its own CPU
        # tasks, overlapping the model instead of taking turns with it.
        max_retries=DECODE_TASK_RETRIES,
    )
    config = PredictorConfig(
        model=spec.model.model_dump(mode="json", exclude_none=True),
        top_k=spec.output.topK,
        device=compute.device,
        precision=compute.precision,
        threads=max(1, int(compute.cpusPerActor)),
    )
    return decoded.map_batches(
        TorchPredictor,
        fn_constructor_kwargs={"config": config},
        compute=ray.data.ActorPoolStrategy(min_size=compute.minActors, max_size=compute.maxActors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=compute.cpusPerActor,
        num_gpus=compute.gpusPerActor,
    )


def run_pipeline(spec: BatchInferenceSpec, on_progress: Callable[[ProgressReport], None] | None = None) -> RunResult:
    """Run one BatchInference to completion; raises on anything that is not a per-row error."""
    started_at = datetime.now(UTC)
    start = time.monotonic()
    output = storage.resolve(spec.output.uri)
    commit.prepare_output(output, spec.output.mode)
    source = inputs.open_source(spec.input)
    writer = commit.ShardWriter(output, run_id=uuid.uuid4().hex[:8])
    labels: Counter = Counter()
    pending: list[pa.Table] = []
    pending_rows, last_flush = 0, time.monotonic()

    def flush() -> None:
        nonlocal pending, pending_rows, last_flush
        if pending:
            writer.write(pa.concat_tables(pending))
        pending, pending_rows, last_flush = [], 0, time.monotonic()
        if on_progress:
            on_progress(_progress(writer.shards, source.total, time.monotonic() - start))

    for table in build_dataset(spec, source).iter_batches(batch_format="pyarrow", batch_size=None):
        pending.append(table)
        pending_rows += table.num_rows
        labels.update(label for label in table["label"].to_pylist() if label is not None)
        if pending_rows >= SHARD_ROWS or time.monotonic() - last_flush >= SHARD_SECONDS:
            flush()
    flush()
    seconds = time.monotonic() - start
    report = _progress(writer.shards, source.total, seconds)
    if report.processed != source.total:
        raise RuntimeError(f"wrote {report.processed} rows for {source.total} inputs; output is incomplete")
    manifest = {
        "apiVersion": "batchinfer.dev/v1alpha1",
        "model": spec.model.describe(),
        "input": spec.input.uri,
        "output": spec.output.uri,
        "counts": {"total": source.total, "succeeded": source.total - report.failed, "failed": report.failed},
        "shards": commit.shards_payload(writer.shards),
        "startTime": started_at.isoformat(),
        "endTime": datetime.now(UTC).isoformat(),
        "seconds": round(seconds, 3),
        "rowsPerSecond": round(source.total / seconds, 3) if seconds else None,
    }
    commit.write_success(output, manifest)
    return RunResult(
        total=source.total,
        succeeded=source.total - report.failed,
        failed=report.failed,
        seconds=seconds,
        output_uri=spec.output.uri,
        manifest=manifest,
        label_counts=labels,
    )


def _progress(shards: list[commit.Shard], total: int, seconds: float) -> ProgressReport:
    return ProgressReport(
        processed=sum(s.rows for s in shards),
        failed=sum(s.failed for s in shards),
        total=total,
        seconds=seconds,
    )
