"""The inference pipeline: inputs → decode (CPU tasks) → predict (actor pool) → shards → `_SUCCESS.json`.

Predictions stream back to the driver, which commits them as shards (see `commit`): rows are small (a key,
classes, scores), so the driver sees every row once, counts progress exactly, enforces the error policy
and the stall timeout, and commits output in order. Inputs already committed by an earlier attempt of the
same job are skipped.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import ray.data

from batchinfer_job import commit, inputs, storage
from batchinfer_job.decode import decode_batch
from batchinfer_job.models import preprocess_for
from batchinfer_job.predictor import (
    CONTRACT_ERROR_COLUMN,
    PredictorConfig,
    PredictorContractError,
    TorchPredictor,
    load_predictor_class,
)
from batchinfer_job.progress import ProgressReport
from batchinfer_job.spec import BatchInferenceSpec, ErrorPolicySpec

SHARD_SECONDS = 20.0
TASK_RETRIES = 3  # per decode task and model actor, also when the OOM killer ends them (see local.py)
_DECODE_BYTES_PER_IMAGE = 4 * 2**20  # a large photo decoded at full size, its bytes and its crop
_DECODE_BASE_BYTES = 256 * 2**20  # the worker process: interpreter, Ray, pyarrow and PIL (no torch)


def decode_task_memory(batch_size: int) -> int:
    return _DECODE_BASE_BYTES + batch_size * _DECODE_BYTES_PER_IMAGE


class ErrorThresholdExceededError(RuntimeError):
    """More rows failed than errorPolicy allows; the job stops without `_SUCCESS.json`."""


class StallError(TimeoutError):
    """No row was committed for timeouts.stallSeconds."""


class AllRowsFailedError(RuntimeError):
    """Every input became an error row and errorPolicy sets no threshold that allows it."""


@dataclass
class RunResult:
    total: int  # every input of the job
    succeeded: int
    failed: int
    resumed: int  # rows committed by earlier attempts and skipped by this one
    processed: int  # rows this attempt predicted and committed
    seconds: float
    output_uri: str
    manifest: dict
    label_counts: Counter = field(default_factory=Counter)
    skipped: dict[str, int] = field(default_factory=dict)  # files under input.uri that are not inputs
    time_to_first_row: float | None = None  # seconds from the job's start to its first committed row
    steady_rows_per_second: float | None = None  # throughput after the first committed shard

    @property
    def rows_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def default_batch_size(spec: BatchInferenceSpec) -> int:
    if spec.batching.batchSize:
        return spec.batching.batchSize
    return 64 if spec.compute.gpusPerActor > 0 else 16


def build_dataset(spec: BatchInferenceSpec, source: inputs.InputSource) -> ray.data.Dataset:
    """The lazy Ray Data plan: decode on CPU tasks, predict on the actor pool."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates the remote-args keywords (max_retries, max_restarts) without a replacement yet;
        # they are the only way to make retries finite, so the warning is silenced here, and only here.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return _build_dataset(spec, source)


def _build_dataset(spec: BatchInferenceSpec, source: inputs.InputSource) -> ray.data.Dataset:
    compute = spec.compute
    batch_size = default_batch_size(spec)
    if source.dataset is None:
        raise ValueError("build_dataset needs inputs left to process")
    decoded = source.dataset.map_batches(
        decode_batch,  # type: ignore[arg-type]  # Ray's UDF type wants positional-only batches
        fn_kwargs={
            "preprocess": preprocess_for(spec.model),
            "max_bytes": spec.input.maxImageBytes,
            "max_pixels": spec.input.maxImagePixels,
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=compute.preprocessCpus,
        # What a decode task holds: encoded and full-size decoded images plus the fixed-size output. Declared
        # resources that differ from the actor's also keep Ray from fusing decode into the model actor, so
        # decode runs in its own CPU tasks, overlapping the model instead of taking turns with it.
        memory=decode_task_memory(batch_size),
        max_retries=TASK_RETRIES,  # finite: a task that keeps dying fails the job instead of looping
    )
    config = PredictorConfig(
        model=spec.model.model_dump(mode="json", exclude_none=True),
        top_k=spec.output.topK,
        device=compute.device,
        precision=compute.precision,
        threads=compute.torchThreads or max(1, int(compute.cpusPerActor)),
        optimize=compute.optimize,
        batch_timeout=spec.timeouts.perBatchSeconds,
    )
    return decoded.map_batches(
        TorchPredictor,
        fn_constructor_kwargs={"config": config},
        compute=ray.data.ActorPoolStrategy(min_size=compute.minActors, max_size=compute.maxActors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=compute.cpusPerActor,
        num_gpus=compute.gpusPerActor,
        max_restarts=TASK_RETRIES,
        max_task_retries=TASK_RETRIES,
    )


def check_error_policy(policy: ErrorPolicySpec, failed: int, total: int) -> None:
    """Raise once the error rows so far cross a threshold (failed only grows, so crossing is final)."""
    if policy.maxFailedRecords is not None and failed > policy.maxFailedRecords:
        raise ErrorThresholdExceededError(
            f"{failed} error rows exceed errorPolicy.maxFailedRecords={policy.maxFailedRecords} "
            f"({failed} of {total} inputs failed so far); see <output>/_errors/"
        )
    if policy.maxFailedPercent is not None and total and 100.0 * failed / total > policy.maxFailedPercent:
        raise ErrorThresholdExceededError(
            f"{failed} error rows ({100.0 * failed / total:.2f}% of {total} inputs) exceed "
            f"errorPolicy.maxFailedPercent={policy.maxFailedPercent:g}; see <output>/_errors/"
        )


def check_not_all_failed(policy: ErrorPolicySpec, failed: int, total: int) -> None:
    """A job in which every row failed has failed, unless errorPolicy sets a threshold that allows it."""
    if total and failed == total and policy.maxFailedRecords is None and policy.maxFailedPercent is None:
        raise AllRowsFailedError(
            f"all {total} inputs became error rows (see <output>/_errors/); nothing was predicted. "
            "To accept this, set errorPolicy.maxFailedPercent: 100"
        )


def stream_tables(dataset: ray.data.Dataset, stall_seconds: float | None) -> Iterator[pa.Table]:
    """Prediction tables as they come; StallError when none arrives within `stall_seconds`."""
    if stall_seconds is None:
        yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)
        return
    items: queue.Queue = queue.Queue(maxsize=8)
    done = object()

    def pump() -> None:
        try:
            for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                items.put(table)
        except BaseException as err:  # handed to the consuming thread and re-raised there
            items.put(err)
        items.put(done)

    threading.Thread(target=pump, daemon=True, name="prediction-stream").start()
    while True:
        try:
            item = items.get(timeout=stall_seconds)
        except queue.Empty:
            raise StallError(
                f"no prediction for {stall_seconds:g} s (timeouts.stallSeconds): a model call or a worker hangs"
            ) from None
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


@dataclass(frozen=True)
class Timing:
    """Monotonic times of one run: its start, its end, its first committed shard (and that shard's rows)."""

    start: float
    end: float
    first_shard_at: float | None
    first_shard_rows: int

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def time_to_first_row(self) -> float | None:
        return None if self.first_shard_at is None else self.first_shard_at - self.start

    def steady_rows_per_second(self, processed: int) -> float | None:
        """Rows/s after the first shard (start-up excluded); None without a second shard's worth of time."""
        if self.first_shard_at is None or self.end - self.first_shard_at < 1e-3:
            return None
        return (processed - self.first_shard_rows) / (self.end - self.first_shard_at)


def run_pipeline(spec: BatchInferenceSpec, on_progress: Callable[[ProgressReport], None] | None = None) -> RunResult:
    """Run (or resume) one BatchInference to completion; raises on anything that is not a per-row error.

    Inputs are listed before the output is touched: a job whose inputs cannot be read deletes nothing.
    """
    started_at = datetime.now(UTC)
    start = time.monotonic()
    if spec.model.predictor is not None:
        load_predictor_class(spec.model.predictor)  # a wrong reference fails here, before Ray starts work
    listed = inputs.list_inputs(spec.input)
    store = commit.OutputStore(storage.resolve(spec.output.uri))
    earlier = store.prepare(spec.output.mode, commit.job_fingerprint(spec))
    done_keys = store.committed_keys(earlier)
    source = inputs.open_source(listed, rows_per_block=default_batch_size(spec), skip=done_keys)
    run_id = uuid.uuid4().hex[:8]
    counts = {"rows": sum(s.rows for s in earlier), "failed": sum(s.failed for s in earlier), "this_run": 0}
    labels: Counter = Counter()
    pending: list[pa.Table] = []
    last_flush = time.monotonic()
    first_shard: dict[str, float] = {}  # when this run committed its first shard, and how many rows it held

    def report() -> ProgressReport:
        return ProgressReport(counts["rows"], counts["failed"], source.all_total, time.monotonic() - start)

    def flush() -> None:
        nonlocal pending, last_flush
        if pending:
            shard = store.write_shard(f"part-{run_id}-{counts['this_run']:09d}", pa.concat_tables(pending))
            counts["rows"] += shard.rows
            counts["failed"] += shard.failed
            counts["this_run"] += shard.rows
            first_shard.setdefault("at", time.monotonic())
            first_shard.setdefault("rows", shard.rows)
        pending, last_flush = [], time.monotonic()
        if on_progress:
            on_progress(report())
        check_error_policy(spec.errorPolicy, counts["failed"], source.all_total)

    check_error_policy(spec.errorPolicy, counts["failed"], source.all_total)
    if source.total:
        pending_rows = 0
        for table in stream_tables(build_dataset(spec, source), spec.timeouts.stallSeconds):
            if CONTRACT_ERROR_COLUMN in table.column_names:
                raise PredictorContractError(table[CONTRACT_ERROR_COLUMN][0].as_py())
            pending.append(table)
            pending_rows += table.num_rows
            labels.update(label for label in table["label"].to_pylist() if label is not None)
            if pending_rows >= spec.output.shardRows or time.monotonic() - last_flush >= SHARD_SECONDS:
                flush()
                pending_rows = 0
    flush()
    timing = Timing(start, time.monotonic(), first_shard.get("at"), int(first_shard.get("rows", 0)))
    return finish(spec, store, source, run_id, started_at, timing, counts["this_run"], labels)


def finish(
    spec: BatchInferenceSpec,
    store: commit.OutputStore,
    source: inputs.InputSource,
    run_id: str,
    started_at: datetime,
    timing: Timing,
    processed: int,
    labels: Counter,
) -> RunResult:
    """Choose an exactly-once set of committed shards, check it covers every input, write `_SUCCESS.json`."""
    shards, committed = store.exactly_once(run_id)
    missing = set(source.all_keys) - set(committed)
    if missing or len(committed) != len(set(committed)):
        raise RuntimeError(
            f"committed output does not cover the inputs exactly once: {len(missing)} missing, "
            f"{len(committed) - len(set(committed))} repeated; rerun to resume"
        )
    total, failed = len(committed), sum(s.failed for s in shards)
    check_not_all_failed(spec.errorPolicy, failed, total)
    seconds, first_row, steady = timing.seconds, timing.time_to_first_row, timing.steady_rows_per_second(processed)
    manifest = {
        "apiVersion": "batchinfer.dev/v1alpha1",
        "model": spec.model.describe(),
        "input": spec.input.uri,
        "output": spec.output.uri,
        "counts": {"total": total, "succeeded": total - failed, "failed": failed},
        "attempt": {"run": run_id, "processed": processed, "resumed": source.all_total - source.total},
        "skipped": source.skipped,
        "shards": commit.shards_payload(shards),
        "startTime": started_at.isoformat(),
        "endTime": datetime.now(UTC).isoformat(),
        "seconds": round(seconds, 3),
        "rowsPerSecond": round(processed / seconds, 3) if seconds else None,
        "timeToFirstRowSeconds": None if first_row is None else round(first_row, 3),
        "rowsPerSecondAfterFirstShard": None if steady is None else round(steady, 3),
    }
    store.write_success(manifest)
    return RunResult(
        total=total,
        succeeded=total - failed,
        failed=failed,
        resumed=source.all_total - source.total,
        processed=processed,
        seconds=seconds,
        output_uri=spec.output.uri,
        manifest=manifest,
        label_counts=labels,
        skipped=source.skipped,
        time_to_first_row=first_row,
        steady_rows_per_second=steady,
    )
