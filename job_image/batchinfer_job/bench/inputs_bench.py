"""Inputs at scale: driver peak RSS and time to first row for N and 10N inputs of each input kind.

Each case is a real `batchinfer run` in its own process (local Ray, the trivial DominantChannelPredictor), so the
driver's peak RSS is that process's own (`wait4`'s ru_maxrss; Ray's daemons and workers are other processes),
and time to first row is `_SUCCESS.json`'s timeToFirstRowSeconds (from the pipeline's start: listing included,
Ray's start-up not). One run prints the ratios 10N/N.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from batchinfer_job.bench.images import make_image_set

# kind → (N, 10N): the sizes issue 11 names; a manifest is measured at 10k and 200k lines, each beside the same
# files as a folder (its first row should come within 1.5x of theirs)
SIZES = {
    "parquet-bytes": (2_000, 20_000),
    "parquet-paths": (100_000, 1_000_000),
    "files": (10_000, 100_000),
    "manifest": (10_000, 200_000),
}
BASE_IMAGES = 256  # distinct JPEGs the inputs repeat
ROWS_PER_PARQUET_FILE = 2_000
PREDICTOR = "batchinfer_job.examples:DominantChannelPredictor"


@dataclass(frozen=True)
class CaseResult:
    kind: str
    rows: int
    peak_rss_mib: float
    time_to_first_row: float
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def base_images(folder: Path) -> list[Path]:
    """Small real-photo JPEGs (224 px on the long side, ~10 KB): decode stays cheap, bytes stay realistic."""
    small = folder / "base"
    paths = sorted(small.glob("*.jpg"))
    if len(paths) == BASE_IMAGES:
        return paths
    small.mkdir(parents=True, exist_ok=True)
    for i, source in enumerate(make_image_set(folder / "photos", BASE_IMAGES)):
        with Image.open(source) as img:
            img.thumbnail((224, 224))
            img.save(small / f"img_{i:04d}.jpg", quality=90)
    return sorted(small.glob("*.jpg"))


def _parquet(folder: Path, rows: int, column: Callable[[int], object], name: str, kind: pa.DataType) -> None:
    folder.mkdir(parents=True)
    for start in range(0, rows, ROWS_PER_PARQUET_FILE):
        count = min(ROWS_PER_PARQUET_FILE, rows - start)
        ids = pa.array([f"row-{start + i:09d}" for i in range(count)])
        table = pa.table({"id": ids, name: pa.array([column(start + i) for i in range(count)], kind)})
        pq.write_table(table, folder / f"part-{start // ROWS_PER_PARQUET_FILE:05d}.parquet")


def make_inputs(kind: str, rows: int, folder: Path) -> dict[str, object]:
    """Write (or reuse) the inputs of a case; returns the spec's `input` section."""
    images = [p.resolve() for p in base_images(folder)]
    where = folder / f"{kind}-{rows}"
    done = where / ".complete"
    if not done.exists():
        shutil.rmtree(where, ignore_errors=True)
        if kind == "parquet-bytes":
            blobs = [p.read_bytes() for p in images]
            _parquet(where, rows, lambda i: blobs[i % len(blobs)], "image", pa.binary())
        elif kind == "parquet-paths":
            _parquet(where, rows, lambda i: str(images[i % len(images)]), "path", pa.string())
        elif kind == "manifest":  # one manifest naming the files of the folder case of the same size
            # absolute: a relative line is read beside the manifest, not from here
            files = Path(str(make_inputs("files", rows, folder)["uri"])).resolve()
            where.mkdir(parents=True)
            (where / "inputs.txt").write_text("".join(f"{files / f'img_{i:07d}.jpg'}\n" for i in range(rows)))
        else:  # hard links in one flat folder: the driver lists it itself (folders would be listed by workers)
            where.mkdir(parents=True)
            for i in range(rows):
                os.link(images[i % len(images)], where / f"img_{i:07d}.jpg")
        done.write_text("")
    if kind == "parquet-bytes":
        return {"uri": str(where), "format": "parquet", "imageColumn": "image", "keyColumn": "id"}
    if kind == "parquet-paths":
        return {"uri": str(where), "format": "parquet", "pathColumn": "path", "keyColumn": "id"}
    if kind == "manifest":
        return {"uri": str(where / "inputs.txt"), "format": "manifest"}
    return {"uri": str(where)}


def run_measured(command: list[str], log_path: Path) -> tuple[int, resource.struct_rusage]:
    """Run `command` to its end, its output to `log_path`; its exit code and resource usage (peak RSS).

    A file, not a pipe: wait4 reads nothing while it waits, so a pipe would fill (64 KiB of progress lines: a
    200,000-line run) and block the command's logging thread for good."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def run_case(kind: str, rows: int, folder: Path) -> CaseResult:
    """One `batchinfer run` of the case in a fresh process; its peak RSS and `_SUCCESS.json` numbers."""
    out = folder / "out" / f"{kind}-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    spec = {
        "apiVersion": "batchinfer.dev/v1alpha1",
        "kind": "BatchInference",
        "metadata": {"name": f"bench-{kind}"},
        "spec": {
            "model": {"predictor": PREDICTOR},
            "input": make_inputs(kind, rows, folder),
            "output": {"uri": str(out), "shardRows": 4096},
            "batching": {"batchSize": 256},
            "compute": {"preprocessCpus": 0.5, "cpusPerActor": 0.5},
        },
    }
    spec_path = folder / f"{kind}-{rows}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "batchinfer_operator.cli", "run", str(spec_path)]
    log_path = folder / f"{kind}-{rows}.log"
    started = time.monotonic()
    code, usage = run_measured(command, log_path)
    if code != 0:
        output = log_path.read_text(errors="replace")[-20_000:]
        raise RuntimeError(f"{kind} {rows}: batchinfer run failed after {time.monotonic() - started:.0f} s:\n{output}")
    manifest = json.loads((out / "_SUCCESS.json").read_text())
    if manifest["counts"]["total"] != rows:
        raise RuntimeError(f"{kind} {rows}: {manifest['counts']['total']} rows in the output")
    return CaseResult(kind, rows, usage.ru_maxrss / 1024, manifest["timeToFirstRowSeconds"], manifest["seconds"])


def run_inputs_bench(folder: Path, kinds: list[str], scale: float, log: Callable[[str], None]) -> list[CaseResult]:
    results = []
    for kind in kinds:
        for size in SIZES[kind]:
            rows = max(1, int(size * scale))
            cases = [kind, "files"] if kind == "manifest" else [kind]  # a manifest beside the same files as a folder
            for case in cases:
                result = run_case(case, rows, folder)
                first = f"first row {result.time_to_first_row:.1f} s"
                log(f"{case} {rows:,}: peak RSS {result.peak_rss_mib:,.0f} MiB, {first}")
                results.append(result)
    return results


def table(results: list[CaseResult]) -> list[str]:
    lines = [
        f"{'input kind':<15}{'rows':>11}{'driver peak RSS MiB':>21}{'first row s':>13}{'wall s':>9}{'rows/s':>9}",
    ]
    for r in results:
        lines.append(
            f"{r.kind:<15}{r.rows:>11,}{r.peak_rss_mib:>21,.0f}{r.time_to_first_row:>13.1f}{r.seconds:>9.1f}"
            f"{r.rows_per_second:>9,.0f}"
        )
    by_kind: dict[str, list[CaseResult]] = {}
    for r in results:
        by_kind.setdefault(r.kind, []).append(r)
    for kind, (small, large, *_) in ((k, v) for k, v in by_kind.items() if len(v) >= 2):
        lines.append(
            f"{kind}: {large.rows / small.rows:.0f}x the inputs -> driver peak RSS "
            f"{large.peak_rss_mib / small.peak_rss_mib:.2f}x, time to first row "
            f"{large.time_to_first_row / small.time_to_first_row:.2f}x"
        )
    folders = {r.rows: r for r in results if r.kind == "files"}
    for r in (r for r in results if r.kind == "manifest" and r.rows in folders):
        lines.append(
            f"manifest of {r.rows:,} lines: first row {r.time_to_first_row:.1f} s = "
            f"{r.time_to_first_row / folders[r.rows].time_to_first_row:.2f}x the same files as a folder"
        )
    return lines
