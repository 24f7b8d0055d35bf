"""Never lose or duplicate a row: error thresholds, poisoned rows, resume after SIGKILL, overlapping
attempts, hung model calls and stalls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from batchinfer_job.commit import SHARDS_DIR, SUCCESS_FILE, OutputStore, read_committed, read_dead_letters
from batchinfer_job.local import run_local
from batchinfer_job.pipeline import ErrorThresholdExceededError, StallError, run_pipeline, stream_tables
from batchinfer_job.storage import resolve
from tests.helpers import document, make_spec

pytestmark = pytest.mark.usefixtures("local_ray")
FAST = "batchinfer_job.examples:DominantChannelPredictor"
MAGENTA = (255, 0, 255)


def write_images(folder: Path, count: int, corrupt: int = 0, marked: tuple[int, ...] = ()) -> list[str]:
    """`count` small PNGs (marked ones solid magenta) and `corrupt` undecodable files; returns every path."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        color = MAGENTA if i in marked else ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
        Image.new("RGB", (40, 30), color).save(folder / f"img_{i:04d}.png")
    for i in range(corrupt):
        (folder / f"broken_{i:04d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    return sorted(str(p) for p in folder.iterdir())


def spec_for(tmp_path: Path, predictor: str = FAST, **sections):
    body = {"model": {"predictor": predictor}, "batching": {"batchSize": 8}, **sections}
    return make_spec(str(tmp_path / "in"), str(tmp_path / "out"), **body)


def test_three_percent_corrupt_with_five_percent_allowed_succeeds(tmp_path: Path) -> None:
    inputs = write_images(tmp_path / "in", 97, corrupt=3)
    result = run_local(spec_for(tmp_path, errorPolicy={"maxFailedPercent": 5}), on_progress=None)
    assert (result.total, result.failed) == (100, 3)
    dead = read_dead_letters(str(tmp_path / "out")).to_pylist()
    assert sorted(d["key"] for d in dead) == sorted(p for p in inputs if "broken_" in p)
    assert {(d["stage"], d["error_type"]) for d in dead} == {("decode", "UnidentifiedImageError")}
    assert sorted(read_committed(str(tmp_path / "out"), ["key"])["key"].to_pylist()) == inputs


def test_three_percent_corrupt_with_one_percent_allowed_fails_without_success(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 97, corrupt=3)
    with pytest.raises(ErrorThresholdExceededError) as err:
        run_local(spec_for(tmp_path, errorPolicy={"maxFailedPercent": 1}), on_progress=None)
    message = str(err.value)
    assert "errorPolicy.maxFailedPercent=1" in message
    assert "of 100 inputs" in message
    assert not (tmp_path / "out" / SUCCESS_FILE).exists()


def test_max_failed_records_names_the_threshold(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 10, corrupt=3)
    with pytest.raises(ErrorThresholdExceededError, match=r"3 error rows exceed errorPolicy\.maxFailedRecords=2"):
        run_local(spec_for(tmp_path, errorPolicy={"maxFailedRecords": 2}), on_progress=None)


def test_model_raising_on_one_row_costs_only_that_row(tmp_path: Path) -> None:
    inputs = write_images(tmp_path / "in", 20, marked=(5,))
    result = run_local(spec_for(tmp_path, "batchinfer_job.fault_predictors:PoisonedPredictor"), on_progress=None)
    rows = {r["key"]: r for r in read_committed(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == inputs and result.failed == 1
    poisoned = rows[inputs[5]]
    assert poisoned["error"] == "predict: ValueError: poisoned row in batch"
    assert all(r["error"] is None and r["label"] for k, r in rows.items() if k != inputs[5])


def test_out_of_memory_halves_the_model_calls_and_loses_no_row(tmp_path: Path) -> None:
    """A device that fits 4 rows per call, batches of 8 (and a batch of 1 that still fits): every row is
    predicted, none fails; the actor keeps the smaller size (see test_predictor_backoff for the call sizes)."""
    inputs = write_images(tmp_path / "in", 21)
    result = run_local(spec_for(tmp_path, "batchinfer_job.fault_predictors:OutOfMemoryPredictor"), on_progress=None)
    rows = {r["key"]: r for r in read_committed(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == inputs and result.failed == 0
    assert all(r["error"] is None and r["label"] for r in rows.values())


@pytest.mark.parametrize("decode", ["tasks", "device"])
def test_hung_model_call_fails_only_its_row_after_per_batch_timeout(tmp_path: Path, decode: str) -> None:
    """timeouts.perBatchSeconds bounds model calls, whichever stage decodes (decode time has its own limit:
    input.maxDecodeSeconds)."""
    inputs = write_images(tmp_path / "in", 8, marked=(3,))
    spec = spec_for(
        tmp_path,
        "batchinfer_job.fault_predictors:HangingPredictor",
        timeouts={"perBatchSeconds": 1.5},
        compute={"device": "cpu", "decode": decode},
    )
    result = run_local(spec, on_progress=None)
    rows = {r["key"]: r for r in read_committed(str(tmp_path / "out")).to_pylist()}
    assert result.failed == 1
    assert rows[inputs[3]]["error"] == "predict: BatchTimeoutError: model call exceeded timeouts.perBatchSeconds=1.5"


class _BlockingDataset:
    """Stands in for a Ray Dataset whose next batch never comes."""

    def iter_batches(self, **_: object):
        threading.Event().wait(3600)
        yield from ()


def test_stream_reports_a_stall_within_stall_seconds() -> None:
    start = time.monotonic()
    with pytest.raises(StallError, match=r"no prediction for 1\.5 s \(timeouts\.stallSeconds\)"):
        next(iter(stream_tables(_BlockingDataset(), stall_seconds=1.5)))
    assert time.monotonic() - start >= 1.5  # and it returned: a hang would never get here


def run_cli(spec_path: Path, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "batchinfer_operator.cli", "run", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        **popen,
    )


def write_spec_file(tmp_path: Path, spec) -> Path:
    path = tmp_path / "bi.yaml"
    path.write_text(yaml.safe_dump(document(spec.model_dump(mode="json", exclude_none=True))))
    return path


def test_stalled_model_call_fails_the_job_with_its_reason(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 16, marked=(9,))
    spec = spec_for(tmp_path, "batchinfer_job.fault_predictors:HangingPredictor", timeouts={"stallSeconds": 4})
    start = time.monotonic()
    proc = run_cli(write_spec_file(tmp_path, spec), env={"BATCHINFER_HANG_SECONDS": "600"})
    output, _ = proc.communicate(timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, output
    assert "failed: StallError: no prediction for 4 s (timeouts.stallSeconds)" in output
    assert elapsed < 120, f"took {elapsed:.0f} s"  # Ray start-up + stallSeconds + margin, not the 600 s hang
    assert not (tmp_path / "out" / SUCCESS_FILE).exists()


def test_sigkill_then_rerun_commits_every_key_exactly_once_and_rereads_only_unfinished_partitions(
    tmp_path: Path,
) -> None:
    folders = [f"f{i:02d}" for i in range(12)]  # one input partition each (a folder under input.uri)
    inputs = sorted(p for folder in folders for p in write_images(tmp_path / "in" / folder, 4))
    spec = spec_for(
        tmp_path,
        "batchinfer_job.fault_predictors:SlowPredictor",
        batching={"batchSize": 4},
        output={"uri": str(tmp_path / "out"), "shardRows": 4},
    )
    proc = run_cli(write_spec_file(tmp_path, spec), env={"BATCHINFER_SLOW_SECONDS": "1.0"}, start_new_session=True)
    records = tmp_path / "out" / SHARDS_DIR
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(records.glob("*.json"))) < 3:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run
    proc.wait(30)
    os.killpg(proc.pid, signal.SIGKILL)  # then its orphaned Ray processes
    store = OutputStore(resolve(str(tmp_path / "out")))
    before = [k for s in store.committed_shards() for k in store.keys_of(s)]
    assert 12 <= len(before) < len(inputs) and not (tmp_path / "out" / SUCCESS_FILE).exists()
    done = {f for f in folders if sum(Path(k).parent.name == f for k in before) == 4}
    assert done, "no folder was finished before the kill; the test would prove nothing"

    rerun = run_local(spec, on_progress=None)  # the same job: it resumes
    assert rerun.resumed == len(before)
    assert rerun.processed == len(inputs) - len(before)
    read = {Path(p.rstrip("/")).name for p in rerun.partitions_read}
    assert read == set(folders) - done  # finished partitions are not read again
    keys = read_committed(str(tmp_path / "out"), ["key"])["key"].to_pylist()
    assert sorted(keys) == inputs  # none missing, none twice
    manifest = json.loads((tmp_path / "out" / SUCCESS_FILE).read_text())
    assert [p["rows"] for p in manifest["partitions"]] == [4] * 12
    assert manifest["attempt"]["partitionsRead"] == len(read)


def test_overlapping_attempts_still_give_each_key_exactly_once(tmp_path: Path) -> None:
    inputs = write_images(tmp_path / "in", 40)
    spec = spec_for(
        tmp_path,
        compute={"device": "cpu", "minActors": 1, "maxActors": 1, "cpusPerActor": 0.5, "preprocessCpus": 0.5},
        output={"uri": str(tmp_path / "out"), "shardRows": 8},
    )
    results, errors = [], []

    def attempt() -> None:
        try:
            results.append(run_pipeline(spec))
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    store = OutputStore(resolve(str(tmp_path / "out")))
    committed_rows = sum(s.rows for s in store.committed_shards())
    assert committed_rows > len(inputs), "the attempts did not overlap; the test would prove nothing"
    keys = read_committed(str(tmp_path / "out"), ["key"])["key"].to_pylist()
    assert sorted(keys) == inputs
    manifest = json.loads((tmp_path / "out" / SUCCESS_FILE).read_text())
    assert manifest["counts"]["total"] == len(inputs)


def test_a_different_job_never_resumes_another_jobs_output(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 4)
    store = OutputStore(resolve(str(tmp_path / "out")))
    store.prepare("error_if_exists", fingerprint="some-other-job")
    with pytest.raises(Exception, match=r"already holds batchinfer output; set output\.mode: overwrite"):
        run_local(spec_for(tmp_path), on_progress=None)


def test_an_attempt_starting_alongside_another_resumes_instead_of_refusing(tmp_path: Path, monkeypatch) -> None:
    real = OutputStore._resumable
    calls: list[str] = []

    def racy(self: OutputStore, fingerprint: str) -> bool:
        calls.append(fingerprint)
        if len(calls) == 1:  # the other attempt of the job prepares right after this check
            OutputStore(self.location).prepare("error_if_exists", fingerprint)
            return False
        return real(self, fingerprint)

    monkeypatch.setattr(OutputStore, "_resumable", racy)
    assert OutputStore(resolve(str(tmp_path / "out"))).prepare("error_if_exists", "job-1") == []
    assert json.loads((tmp_path / "out" / "_job.json").read_text()) == {"fingerprint": "job-1"}


def test_another_attempts_job_file_still_in_flight_is_not_foreign_data(tmp_path: Path) -> None:
    """Between writing `_job.json`'s temporary file and renaming it, the output must not look foreign."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json.tmp-0123456789abcdef").write_text('{"fingerprint": "job-1"}')
    assert OutputStore(resolve(str(out))).prepare("error_if_exists", "job-1") == []
    assert json.loads((out / "_job.json").read_text()) == {"fingerprint": "job-1"}
    (out / "part-x.parquet").write_bytes(b"data")
    (out / "_job.json").unlink()
    with pytest.raises(Exception, match=r"holds files batchinfer did not write \(part-x\.parquet\)"):
        OutputStore(resolve(str(out))).prepare("error_if_exists", "job-1")
