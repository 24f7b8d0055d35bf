"""The inference pipeline: partitions → read (tasks) → decode (CPU tasks) → predict (actor pool) → shards →
`_SUCCESS.json`.

The driver plans partitions (`inputs`) and never holds an input row: read tasks list folders and read Parquet and
manifests on the workers (`reading`). Predictions stream back to the driver, which commits them as shards (see
`commit`): rows are small (a key, classes, scores), so the driver sees every row once, counts progress exactly,
enforces the error policy and the stall timeout, and commits output in order. Partitions an earlier attempt of the
same job finished are not read again; partly done ones are read and filtered by their own committed keys.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from batchinfer_job import capacity, commit, inputs, reading, stall, storage
from batchinfer_job.decode import decode_batch, fetch_batch
from batchinfer_job.models import ModelLoadError, preprocess_for
from batchinfer_job.predictor import (
    CONTRACT_ERROR_COLUMN,
    PredictorConfig,
    PredictorContractError,
    TorchPredictor,
    load_predictor_class,
)
from batchinfer_job.progress import ProgressReport
from batchinfer_job.spec import BatchInferenceSpec, ErrorPolicySpec, InputSpec

SHARD_SECONDS = 20.0
TASK_RETRIES = 3  # per decode task and model actor, also when the OOM killer ends them (see local.py)
_DECODE_BYTES_PER_IMAGE = 4 * 2**20  # a large photo decoded at full size, its bytes and its crop
_DECODE_BASE_BYTES = 256 * 2**20  # the worker process: interpreter, Ray, pyarrow and PIL (no torch)
DEFAULT_STALL_SECONDS = 600.0  # timeouts.stallSeconds when unset: nothing ends a job that stopped otherwise


log = logging.getLogger(__name__)
_FETCH_BYTES_PER_IMAGE = 2**20  # compute.decode=device: a task holds encoded bytes only


def decode_task_memory(batch_size: int, decode: str = "tasks") -> int:
    per_image = _DECODE_BYTES_PER_IMAGE if decode == "tasks" else _FETCH_BYTES_PER_IMAGE
    return _DECODE_BASE_BYTES + batch_size * per_image


class ErrorThresholdExceededError(RuntimeError):
    """More rows failed than errorPolicy allows; the job stops without `_SUCCESS.json`."""


class StallError(TimeoutError):
    """No row was committed for timeouts.stallSeconds; the message names the stage that starved."""


class ModelActorStartError(ModelLoadError):
    """A model actor raised while starting (loading the model, or GPUs torch cannot use): its own error, one line."""


def actor_start_failure(err: BaseException) -> ModelActorStartError | None:
    """Ray reports an actor whose `__init__` raised as ActorDiedError with the whole remote traceback in its
    text; the last line is the error itself (`package.module.SomeError: message`)."""
    if not (isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed):
        return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line)] or [len(lines) - 1]
    name, _, message = " ".join(lines[starts[-1] :]).partition(": ")  # its message may span lines
    if len(message) > ACTOR_ERROR_CHARS:
        message = message[:ACTOR_ERROR_CHARS] + " …"
    return ModelActorStartError(f"a model actor failed to start: {name.rsplit('.', 1)[-1]}: {message}")


# Where a Python error starts in a traceback: `package.module.SomeError: …` or a builtin `ValueError: …`.
_ERROR_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)+[A-Z]\w*|[A-Z]\w*(?:Error|Exception|Exit|Interrupt)): ")
ACTOR_ERROR_CHARS = 1000


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
    partitions_read: list[str] = field(default_factory=list)  # input partitions this attempt read
    time_to_first_row: float | None = None  # seconds from the job's start to its first committed row
    steady_rows_per_second: float | None = None  # throughput after the first committed shard

    @property
    def rows_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


GPU_BATCH_SIZE = 256  # ResNet-152 bf16 on an H200: 7,454 img/s at 256 against 1,543 at 32 (README)
CPU_BATCH_SIZE = 16


def default_batch_size(spec: BatchInferenceSpec) -> int:
    if spec.batching.batchSize:
        return spec.batching.batchSize
    return GPU_BATCH_SIZE if spec.compute.gpusPerActor > 0 else CPU_BATCH_SIZE


def decode_mode(spec: BatchInferenceSpec) -> str:
    """compute.decode resolved: auto decodes on the device when the model runs on the actor's GPU."""
    compute = spec.compute
    if compute.decode != "auto":
        return compute.decode
    return "device" if compute.gpusPerActor > 0 and compute.device != "cpu" else "tasks"


@dataclass(frozen=True)
class ReadPlan:
    """What this attempt reads: partitions, where their already committed rows are, and the job's ledger."""

    partitions: list[inputs.Partition]
    done_spans: dict[str, list[list]]  # partition → [shard URI, first row, rows] committed earlier
    ledger: object  # a reading.PartitionLedger actor


def build_dataset(spec: BatchInferenceSpec, plan: ReadPlan, shares: capacity.StageShares) -> ray.data.Dataset:
    """The lazy Ray Data plan: read partitions and decode on CPU tasks, predict on the actor pool, each stage
    asking for its fitted share of the cluster's CPUs (`capacity.fit_stages`)."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates the remote-args keywords (max_retries, max_restarts) without a replacement yet;
        # they are the only way to make retries finite, so the warning is silenced here, and only here.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return _build_dataset(spec, plan, shares)


def read_rows(
    input_spec: InputSpec, plan: ReadPlan, rows_per_block: int, shares: capacity.StageShares
) -> ray.data.Dataset:
    """Input rows, read by one task per partition (at most `shares.read_tasks` at once), in blocks of one model
    batch (so decode runs in parallel and predictions stream back batch by batch)."""
    partitions = ray.data.from_items([p.as_row() for p in plan.partitions], override_num_blocks=len(plan.partitions))
    rows = partitions.map_batches(
        reading.read_partitions,  # type: ignore[arg-type]  # Ray's UDF type wants positional-only batches
        fn_kwargs={"spec": input_spec, "ledger": plan.ledger, "done": plan.done_spans},
        batch_size=1,
        num_cpus=shares.read_cpus,
        compute=ray.data.TaskPoolStrategy(size=shares.read_tasks),
        max_retries=TASK_RETRIES,
    )
    reblocked = rows.repartition(target_num_rows_per_block=rows_per_block)
    # Ray Data fuses map_batches -> repartition into one task only when their remote args and task pools match,
    # and `repartition` takes neither (its tasks ask for a whole CPU). Unfused, a repartition task paused by
    # backpressure held a CPU that decode needed: on 2 CPUs a 1,000,000-row job stopped committing after 56,000
    # rows. Giving it the read task's args and pool makes every read task emit model-batch blocks itself (Ray
    # 2.60's logical operator; tests/test_hostile_inputs.py checks that the two stay fusable).
    read_op: Any = rows._logical_plan.dag  # a MapBatches logical operator
    object.__setattr__(reblocked._logical_plan.dag, "ray_remote_args", dict(read_op.ray_remote_args))
    object.__setattr__(reblocked._logical_plan.dag, "compute", read_op.compute)
    return reblocked


def _build_dataset(spec: BatchInferenceSpec, plan: ReadPlan, shares: capacity.StageShares) -> ray.data.Dataset:
    compute = spec.compute
    batch_size = default_batch_size(spec)
    decode = decode_mode(spec)
    if not plan.partitions:
        raise ValueError("build_dataset needs partitions left to read")
    limits = {"max_bytes": spec.input.maxImageBytes, "max_pixels": spec.input.maxImagePixels}
    cpu_stage, kwargs = (
        (decode_batch, {"preprocess": preprocess_for(spec.model), "max_seconds": spec.input.maxDecodeSeconds, **limits})
        if decode == "tasks"
        else (fetch_batch, limits)  # bytes only: the model actor decodes
    )
    decoded = read_rows(spec.input, plan, batch_size, shares).map_batches(
        counted_stage,  # type: ignore[arg-type]  # Ray's UDF type wants positional-only batches
        fn_kwargs={"stage": cpu_stage, "ledger": plan.ledger, **kwargs},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=shares.decode_cpus,
        # What a decode task holds: encoded and full-size decoded images plus the fixed-size output. Declared
        # resources that differ from the actor's also keep Ray from fusing decode into the model actor, so
        # decode runs in its own CPU tasks, overlapping the model instead of taking turns with it.
        memory=decode_task_memory(batch_size, decode),
        max_retries=TASK_RETRIES,  # finite: a task that keeps dying fails the job instead of looping
    )
    config = PredictorConfig(
        model=spec.model.model_dump(mode="json", exclude_none=True),
        top_k=spec.output.topK,
        device=compute.device,
        precision=compute.precision,
        threads=compute.torchThreads or max(1, int(compute.cpusPerActor)),
        optimize=compute.optimize,
        batch_rows=batch_size,
        rows_per_actor=rows_left_at_least(plan) // shares.max_actors,
        batch_timeout=spec.timeouts.perBatchSeconds,
        max_pixels=spec.input.maxImagePixels,
        max_decode_seconds=spec.input.maxDecodeSeconds,
        ledger=plan.ledger,
    )
    # Decoding in the actor: two calls at a time, so one batch decodes (its own CUDA stream) while the model,
    # behind the actor's lock, runs the other (TorchPredictor.__call__).
    overlap = decode == "device"
    return decoded.map_batches(
        TorchPredictor,
        fn_constructor_kwargs={"config": config},
        compute=ray.data.ActorPoolStrategy(
            min_size=compute.minActors,
            max_size=shares.max_actors,
            max_concurrent_calls_per_actor=2 if overlap else None,
            enable_true_multi_threading=overlap,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=compute.cpusPerActor,
        num_gpus=compute.gpusPerActor,
        max_restarts=TASK_RETRIES,  # finite: an actor that keeps dying (a poisoned batch) fails the job
        # A call waits for the actor's restart however long that takes (-1: bounded by max_restarts). With a finite
        # count, a lost worker pod failed the job: calls to the actor on the dead node were refused within
        # seconds, long before a new worker pod joined and the actor could restart there.
        max_task_retries=-1,
    )


def rows_left_at_least(plan: ReadPlan) -> int:
    """A lower bound on the rows this attempt predicts: what the plan counts, less the rows committed earlier."""
    committed = sum(rows for spans in plan.done_spans.values() for _, _, rows in spans)
    return max(0, inputs.rows_at_least(plan.partitions) - committed)


def check_error_policy(policy: ErrorPolicySpec, failed: int, total: int | None) -> None:
    """Raise once the error rows so far cross a threshold (failed only grows, so crossing is final).

    maxFailedPercent needs the total: it is checked once every partition has been read (and at the end).
    """
    if policy.maxFailedRecords is not None and failed > policy.maxFailedRecords:
        raise ErrorThresholdExceededError(
            f"{failed} error rows exceed errorPolicy.maxFailedRecords={policy.maxFailedRecords} "
            f"({failed} of {'?' if total is None else total} inputs failed so far); see <output>/_errors/"
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


def stream_tables(
    dataset: ray.data.Dataset, stall_seconds: float, diagnose: Callable[[], str] | None = None
) -> Generator[pa.Table, None, None]:
    """Prediction tables as they come; StallError when none arrives within `stall_seconds`, saying what
    `diagnose` finds (the stage that starved) at that moment.

    However the stream ends early — a stall, an error, the consumer giving up (close it) — Ray Data's work for
    the dataset is stopped, so no task or model actor keeps holding the cluster's resources.
    """
    items: queue.Queue = queue.Queue(maxsize=8)
    done = object()
    stopped = threading.Event()

    def hand_over(item: object) -> bool:
        while not stopped.is_set():
            try:
                items.put(item, timeout=1)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                if not hand_over(table):
                    return
        except BaseException as err:  # handed to the consuming thread and re-raised there
            hand_over(err)
            return
        hand_over(done)

    threading.Thread(target=pump, daemon=True, name="prediction-stream").start()
    finished = False
    try:
        while True:
            try:
                item = items.get(timeout=stall_seconds)
            except queue.Empty:
                why = diagnose() if diagnose else "a model call or a worker hangs"
                raise StallError(f"no prediction for {stall_seconds:g} s (timeouts.stallSeconds): {why}") from None
            if item is done:
                finished = True
                return
            if isinstance(item, BaseException):
                raise actor_start_failure(item) or item
            yield item
    finally:
        stopped.set()
        if not finished:
            stop_execution(dataset)


def stop_execution(dataset: ray.data.Dataset) -> None:
    """End Ray Data's work for `dataset`: its tasks and its model actors (Ray 2.60 keeps the running executor on
    the dataset; shutting it down with force kills them)."""
    executor = getattr(dataset, "_current_executor", None)
    if executor is not None:
        executor.shutdown(force=True)


@dataclass(frozen=True)
class Timing:
    """Monotonic times of one run: its start, its end, its first prediction at the driver, its first committed
    shard (and that shard's rows)."""

    start: float
    end: float
    first_row_at: float | None
    first_shard_at: float | None
    first_shard_rows: int

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def time_to_first_row(self) -> float | None:
        """Seconds from the start (inputs planned, model loaded and all) to the first prediction at the driver."""
        return None if self.first_row_at is None else self.first_row_at - self.start

    def steady_rows_per_second(self, processed: int) -> float | None:
        """Rows/s after the first shard (start-up excluded); None without a second shard's worth of time."""
        if self.first_shard_at is None or self.end - self.first_shard_at < 1e-3:
            return None
        return (processed - self.first_shard_rows) / (self.end - self.first_shard_at)


@dataclass
class Ledger:
    """The driver's view of which partitions are read: earlier attempts' records plus this attempt's ledger."""

    partitions: list[str]  # every partition of the job, in order
    earlier: dict[str, list]  # partition → [rows, digest] read by earlier attempts
    actor: object  # reading.PartitionLedger
    read: dict[str, list] = field(default_factory=dict)  # read by this attempt
    skipped: dict[str, int] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)  # partitions already written into a commit record

    def refresh(self) -> None:
        """Fetch this attempt's new records; InputError for a partition that could not be read."""
        news, problems = ray.get(self.actor.since.remote(len(self.read)))  # type: ignore[attr-defined]
        for partition, record, skipped in news:
            self.read[partition] = record
            for reason, count in skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + count
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise inputs.InputError(problems[0] + more)

    def expected(self) -> dict[str, list]:
        """partition → [rows, digest] of every partition read so far (this attempt's reading wins)."""
        return {p: self.read.get(p) or self.earlier[p] for p in self.partitions if p in self.read or p in self.earlier}

    def total(self) -> int | None:
        """Rows of the whole job, once every partition is read (until then, None: progress shows n/?)."""
        expected = self.expected()
        return sum(r[0] for r in expected.values()) if len(expected) == len(self.partitions) else None

    def newly_read(self) -> dict[str, list]:
        """Partitions read since the last commit record, to go into the next one (a resumed run skips them)."""
        new = {p: r for p, r in self.read.items() if p not in self.recorded}
        self.recorded.update(new)
        return new


def plan_reading(
    partitions: list[inputs.Partition], store: commit.OutputStore, earlier: list[commit.Shard]
) -> tuple[ReadPlan, Ledger]:
    """Skip partitions an earlier attempt finished; read the rest, minus their committed rows."""
    listed = commit.listed_partitions(earlier)
    before = commit.Coverage.of(earlier)
    spans = before.spans()
    todo = []
    for partition in partitions:
        if partition.id in listed and before.committed.get(partition.id) == _as_int(listed[partition.id]):
            continue  # every row of it is committed: not read again
        todo.append(partition)
    done = {p.id: [[store.location.child(f).uri, a, n] for f, a, n in spans[p.id]] for p in todo if p.id in spans}
    # The job's bookkeeping lives and dies with the driver: placed on a worker node, it died with that node
    # and took the job with it (a worker pod lost mid-run on a real cluster).
    on_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = reading.PartitionLedger.options(scheduling_strategy=on_driver).remote()  # type: ignore[attr-defined]
    ledger = Ledger([p.id for p in partitions], dict(listed), actor)
    ledger.recorded.update(listed)
    return ReadPlan(todo, done, actor), ledger


def _as_int(record: list) -> list:
    return [record[0], int(record[1], 16)]


def stall_diagnosis(
    spec: BatchInferenceSpec, shares: capacity.StageShares, plan: ReadPlan, predicted: Callable[[], int]
) -> Callable[[], str]:
    """What a stall's message says: the stage that starved (`stall.starved_stage`)."""

    def diagnose() -> str:
        ticks: dict[str, int] = ray.get(plan.ledger.progress.remote())  # type: ignore[attr-defined,assignment]
        free = {k: float(v) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        progress = stall.StageProgress.of(ticks)
        return stall.starved_stage(progress, predicted(), shares, free, spec.compute.gpusPerActor)

    return diagnose


def counted_stage(batch: dict[str, np.ndarray], *, stage: Callable[..., dict], ledger: Any, **kwargs: Any) -> dict:
    """A CPU stage (decode or fetch) that tells the job's ledger how many rows it finished."""
    out = stage(batch, **kwargs)
    if ledger is not None:
        ledger.tick.remote("decoded", len(batch["key"]))  # not awaited: no cost on the hot path
    return out


def run_pipeline(
    spec: BatchInferenceSpec,
    on_progress: Callable[[ProgressReport], None] | None = None,
    planned: capacity.Capacity | None = None,
) -> RunResult:
    """Run (or resume) one BatchInference to completion; raises on anything that is not a per-row error.

    The stages' CPU shares are fitted to the cluster (the larger of what Ray reports and `planned`, the
    RayJob's workers) before anything is read; inputs are planned before the output is touched: a job whose
    inputs cannot be listed, or whose stages cannot fit, deletes nothing.
    """
    started_at = datetime.now(UTC)
    start = time.monotonic()
    if spec.model.predictor is not None:
        load_predictor_class(spec.model.predictor)  # a wrong reference fails here, before Ray starts work
    live = capacity.live_capacity()
    shares = capacity.fit_stages(spec.compute, capacity.larger(live, planned) if planned else live)
    log.info("stages %s", shares.describe())
    input_plan = inputs.plan_inputs(spec.input, count_rows=lambda p: reading.count_rows(p, spec.input))
    store = commit.OutputStore(storage.resolve(spec.output.uri))
    with commit.writing(store.location, "preparing the output"):
        earlier = store.prepare(spec.output.mode, commit.job_fingerprint(spec))
    plan, ledger = plan_reading(input_plan.partitions, store, earlier)
    run_id = uuid.uuid4().hex[:8]
    counts = {"rows": sum(s.rows for s in earlier), "failed": sum(s.failed for s in earlier), "this_run": 0}
    labels: Counter = Counter()
    pending: list[pa.Table] = []
    last_flush = time.monotonic()
    first_shard: dict[str, float] = {}  # when this run committed its first shard, and how many rows it held
    first_row_at: float | None = None

    def report() -> ProgressReport:
        return ProgressReport(counts["rows"], counts["failed"], ledger.total(), time.monotonic() - start)

    def flush() -> None:
        nonlocal pending, last_flush
        ledger.refresh()
        if pending:
            name = f"part-{run_id}-{counts['this_run']:09d}"
            with commit.writing(store.location, f"writing shard {name}"):
                shard = store.write_shard(name, pa.concat_tables(pending), listed=ledger.newly_read())
            counts["rows"] += shard.rows
            counts["failed"] += shard.failed
            counts["this_run"] += shard.rows
            first_shard.setdefault("at", time.monotonic())
            first_shard.setdefault("rows", shard.rows)
        pending, last_flush = [], time.monotonic()
        if on_progress:
            on_progress(report())
        check_error_policy(spec.errorPolicy, counts["failed"], ledger.total())

    check_error_policy(spec.errorPolicy, counts["failed"], ledger.total())
    if plan.partitions:
        pending_rows = predicted = 0
        stall_seconds = spec.timeouts.stallSeconds or DEFAULT_STALL_SECONDS
        diagnose = stall_diagnosis(spec, shares, plan, lambda: predicted)
        tables = stream_tables(build_dataset(spec, plan, shares), stall_seconds, diagnose)
        with contextlib.closing(tables):  # closed on any error: Ray Data's work stops with it
            for table in tables:
                if CONTRACT_ERROR_COLUMN in table.column_names:
                    raise PredictorContractError(table[CONTRACT_ERROR_COLUMN][0].as_py())
                first_row_at = first_row_at or time.monotonic()
                predicted += table.num_rows
                pending.append(table)
                pending_rows += table.num_rows
                labels.update(label for label in table["label"].to_pylist() if label is not None)
                if pending_rows >= spec.output.shardRows or time.monotonic() - last_flush >= SHARD_SECONDS:
                    flush()
                    pending_rows = 0
    flush()
    timing = Timing(start, time.monotonic(), first_row_at, first_shard.get("at"), int(first_shard.get("rows", 0)))
    skipped = _merged(input_plan.skipped, ledger.skipped)
    return finish(spec, store, ledger, run_id, started_at, timing, counts["this_run"], labels, skipped)


def _merged(*counts: dict[str, int]) -> dict[str, int]:
    merged: Counter = Counter()
    for count in counts:
        merged.update(count)
    return dict(merged)


def finish(
    spec: BatchInferenceSpec,
    store: commit.OutputStore,
    ledger: Ledger,
    run_id: str,
    started_at: datetime,
    timing: Timing,
    processed: int,
    labels: Counter,
    skipped: dict[str, int],
) -> RunResult:
    """Check per partition that the committed shards hold every input exactly once, write `_SUCCESS.json`."""
    expected = ledger.expected()
    unread = [p for p in ledger.partitions if p not in expected]
    if unread:
        raise commit.CoverageError(f"{len(unread)} input partitions were never read (first: {unread[0]}); rerun")
    total = sum(r[0] for r in expected.values())
    if total == 0:
        shown = "; ".join(f"{n} {reason}" for reason, n in skipped.items())
        raise inputs.InputError(
            f"input.uri {spec.input.uri!r} holds no inputs of format {spec.input.format!r}"
            + (f" (skipped: {shown})" if shown else "")
        )
    coverage = store.exactly_once(run_id, expected)
    failed = coverage.failed
    check_error_policy(spec.errorPolicy, failed, total)
    check_not_all_failed(spec.errorPolicy, failed, total)
    seconds, first_row, steady = timing.seconds, timing.time_to_first_row, timing.steady_rows_per_second(processed)
    resumed = total - processed
    manifest = {
        "apiVersion": "batchinfer.dev/v1alpha1",
        "model": spec.model.describe(),
        "input": spec.input.uri,
        "output": spec.output.uri,
        "counts": {"total": total, "succeeded": total - failed, "failed": failed},
        "attempt": {"run": run_id, "processed": processed, "resumed": resumed, "partitionsRead": len(ledger.read)},
        "skipped": skipped,
        "shards": commit.shards_payload(coverage.shards),
        "partitions": [{"id": p, "rows": expected[p][0], "keyDigest": expected[p][1]} for p in ledger.partitions],
        "startTime": started_at.isoformat(),
        "endTime": datetime.now(UTC).isoformat(),
        "seconds": round(seconds, 3),
        "rowsPerSecond": round(processed / seconds, 3) if seconds else None,
        "timeToFirstRowSeconds": None if first_row is None else round(first_row, 3),
        "rowsPerSecondAfterFirstShard": None if steady is None else round(steady, 3),
    }
    with commit.writing(store.location, "writing _SUCCESS.json"):
        store.write_success(manifest)
    return RunResult(
        total=total,
        succeeded=total - failed,
        failed=failed,
        resumed=resumed,
        processed=processed,
        seconds=seconds,
        output_uri=spec.output.uri,
        manifest=manifest,
        label_counts=labels,
        skipped=skipped,
        time_to_first_row=first_row,
        steady_rows_per_second=steady,
        partitions_read=sorted(ledger.read),
    )
