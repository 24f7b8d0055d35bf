"""Run a BatchInference YAML on this machine, on an embedded Ray bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from batchinfer_job import locations, storage
from batchinfer_job.spec import BatchInferenceSpec

if TYPE_CHECKING:
    from batchinfer_job.pipeline import RunResult
    from batchinfer_job.progress import ProgressReport

# Keep every Ray server on loopback and quiet about auth tokens; must be set before `import ray`.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Finite retries of tasks the memory monitor kills (Ray's default is forever): an input that kills its
    # worker fails the job with a message instead of looping.
    "RAY_task_oom_retries": "3",
}


def localize(spec: BatchInferenceSpec, base: Path | None = None) -> BatchInferenceSpec:
    """Make relative local paths in the spec absolute (relative to `base`, default the working directory)."""
    model = spec.model
    if model.weightsUri:
        model = model.model_copy(update={"weightsUri": locations.absolute_uri(model.weightsUri, base)})
    return spec.model_copy(
        update={
            "model": model,
            "input": spec.input.model_copy(update={"uri": locations.absolute_uri(spec.input.uri, base)}),
            "output": spec.output.model_copy(update={"uri": locations.absolute_uri(spec.output.uri, base)}),
        }
    )


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start (or reuse) an embedded Ray that listens on 127.0.0.1 only."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    # Ray puts the driver's working directory on every worker's sys.path, so a stray `PIL.py` beside the
    # spec would shadow a library inside the workers. Start Ray from an empty folder of its own instead:
    # workers import only installed packages (a user predictor is found the documented way, installed or
    # on PYTHONPATH).
    with contextlib.chdir(tempfile.mkdtemp(prefix="batchinfer-ray-cwd-")):
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=True,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )


def console_progress(report: ProgressReport) -> None:
    eta = f"{report.eta_seconds:.0f}s" if report.eta_seconds is not None else "?"
    print(
        f"progress processed={report.display} failed={report.failed} rows_per_s={report.rows_per_second:.1f} eta={eta}",
        file=sys.stderr,
        flush=True,
    )


def job_failures() -> tuple[type[BaseException], ...]:
    """Errors that end a job with a clear message (imported lazily: they pull in ray)."""
    from batchinfer_job.capacity import CapacityError
    from batchinfer_job.commit import OutputExistsError
    from batchinfer_job.inputs import InputError
    from batchinfer_job.locations import LocationError
    from batchinfer_job.models import ModelLoadError
    from batchinfer_job.pipeline import AllRowsFailedError, ErrorThresholdExceededError, StallError
    from batchinfer_job.predictor import PredictorContractError

    return (
        CapacityError,
        OutputExistsError,
        InputError,
        ModelLoadError,
        ErrorThresholdExceededError,
        AllRowsFailedError,
        StallError,
        PredictorContractError,
        storage.StorageError,
        LocationError,
    )


def run_local(
    spec: BatchInferenceSpec, on_progress: Callable[[ProgressReport], None] | None = console_progress
) -> RunResult:
    spec = localize(spec)
    locations.check_local_paths(spec)
    start_local_ray()
    from batchinfer_job.pipeline import run_pipeline

    return run_pipeline(spec, on_progress=on_progress)


def summary_lines(result: RunResult, top: int = 8) -> list[str]:
    """The short human summary `batchinfer run` prints."""
    lines = [
        f"rows:        {result.total}",
        f"succeeded:   {result.succeeded}",
        f"errors:      {result.failed}",
        f"resumed:     {result.resumed} (committed by an earlier attempt)",
        f"wall time:   {result.seconds:.1f} s",
        f"throughput:  {result.rows_per_second:.1f} rows/s ({result.processed} rows this run)",
        *([f"first row:   {result.time_to_first_row:.1f} s after the job started"] if result.time_to_first_row else []),
        *(
            [f"steady:      {result.steady_rows_per_second:.1f} rows/s after the first shard"]
            if result.steady_rows_per_second
            else []
        ),
        f"output:      {result.output_uri} (manifest: _SUCCESS.json)",
        *(f"skipped:     {count} {reason}" for reason, count in result.skipped.items()),
        "top labels:",
    ]
    lines += [f"  {count:5d}  {label}" for label, count in result.label_counts.most_common(top)]
    return lines
