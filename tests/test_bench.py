"""`batchinfer bench`: medians, spreads and ratios follow from the samples; a tiny real run prints the table,
writes the chart, and ends with the line scripts read."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from batchinfer_job.bench.measure import Sample
from batchinfer_job.bench.pipeline_bench import METHODS, BenchConfig, BenchResult, summary_line, table
from batchinfer_job.device_decode import JPEG_DECODER_NAME
from batchinfer_operator.cli import app

SUMMARY = re.compile(r"^speedup_vs_plain=(\d+\.\d\d) speedup_vs_seed=(\d+\.\d\d)$")
MODEL_ONLY = re.compile(
    r"^\(c\) decode=tasks optimize=auto: steady state (\d+\.\d) img/s \(after the first shard, median\) = "
    r"(\d+)% of model-only (\d+\.\d) img/s; time to first row \d+\.\d s \(median\)$"
)
ROW = re.compile(r"^\((a|b|c)\) .+?\s+(\d+\.\d)\s+(\d+\.\d)-(\d+\.\d)\s+(\d+\.\d\d)x\s+(\d+)$")


def samples(seconds: list[float], images: int = 100, rss_mib: int = 100) -> list[Sample]:
    return [Sample(images=images, seconds=s, peak_rss=rss_mib * 2**20) for s in seconds]


def ratio_bounds(numerator: float, denominator: float, printed_to: float = 0.01) -> tuple[float, float]:
    """Where a ratio printed to `printed_to` can lie, given both operands as printed to 0.1."""
    slack = printed_to / 2
    return (numerator - 0.05) / (denominator + 0.05) - slack, (numerator + 0.05) / (denominator - 0.05) + slack


def test_medians_spreads_and_ratios_follow_from_the_samples() -> None:
    result = BenchResult(BenchConfig(images=100, repeats=3))
    result.samples["plain"] = samples([10.0, 5.0, 4.0])  # 10, 20, 25 img/s: median 20
    result.samples["seed"] = samples([20.0, 10.0, 12.5])  # 5, 10, 8 img/s: median 8
    result.samples["batchinfer"] = samples([4.0, 2.5, 5.0], rss_mib=300)  # 25, 40, 20 img/s: median 25

    assert summary_line(result) == "speedup_vs_plain=1.25 speedup_vs_seed=3.12"
    rows = {m.group(1): m.groups()[1:] for line in table(result) if (m := ROW.match(line))}
    assert rows["a"] == ("20.0", "10.0", "25.0", "1.00", "100")
    assert rows["b"] == ("8.0", "5.0", "10.0", "0.40", "100")
    assert rows["c"] == ("25.0", "20.0", "40.0", "1.25", "300")


def test_model_only_and_time_to_first_row_follow_from_the_runs() -> None:
    result = BenchResult(BenchConfig(images=100, repeats=3), model_only=200.0, decode="device")
    for method in METHODS:
        result.samples[method] = samples([1.0])
    runs = ((90, 4), (150, 2), (120, 3))
    result.runs = [SimpleNamespace(steady_rows_per_second=r, time_to_first_row=t) for r, t in runs]
    assert table(result)[-1] == (
        f"(c) decode=device decoder={JPEG_DECODER_NAME} optimize=auto: steady state 120.0 img/s (after the first "
        "shard, median) = 60% of model-only 200.0 img/s; time to first row 3.0 s (median)"
    )


def test_only_the_chosen_methods_are_tabled_and_compared() -> None:
    result = BenchResult(BenchConfig(images=100, methods=("batchinfer",)))
    result.samples["batchinfer"] = samples([4.0])  # 25 img/s
    rows = [line for line in table(result) if line.startswith("(")]
    assert len(rows) == 1 and rows[0].split()[:3] == ["(c)", "batchinfer", "25.0"] and " - " in rows[0]
    assert summary_line(result) == "batchinfer_images_per_second=25.0"
    result = BenchResult(BenchConfig(images=100, methods=("seed", "batchinfer")))
    result.samples["seed"], result.samples["batchinfer"] = samples([10.0]), samples([4.0])
    assert summary_line(result) == "speedup_vs_seed=2.50"


def test_methods_without_batchinfer_or_unknown_are_refused_naming_the_option() -> None:
    for methods in ("plain,seed", "plain,batchinfer,fastest"):
        result = CliRunner().invoke(app, ["bench", "--methods", methods, "--device", "cpu"])
        assert result.exit_code == 2 and "--methods" in result.output and "with batchinfer" in result.output


def test_the_header_names_the_precision_batchinfer_resolved_to() -> None:
    result = BenchResult(BenchConfig(precision="auto"), batchinfer_dtype="bf16")
    for method in METHODS:
        result.samples[method] = samples([1.0])
    assert table(result)[1] == "precision: (a) and (b) fp32, (c) bf16 (compute.precision=auto)"


def test_a_tiny_real_run_prints_the_table_chart_and_last_line(local_ray: None, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path.parent)  # a relative --out, as `make bench` gives (Ray's workers run elsewhere)
    args = ["bench", "--images", "12", "--repeats", "1", "--batch-size", "4", "--warmup-images", "4"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--precision", "fp32", "--out", tmp_path.name])
    assert result.exit_code == 0, result.output

    lines = result.stdout.strip().splitlines()
    summary = SUMMARY.match(lines[-1])
    assert summary, lines[-1]
    rows = {m.group(1): m.groups()[1:] for line in lines if (m := ROW.match(line))}
    assert sorted(rows) == ["a", "b", "c"]
    plain, seed, ours = (float(rows[k][0]) for k in "abc")
    assert all(float(row[-1]) > 0 for row in rows.values())  # peak RSS of each method's process tree
    # The last line's ratios are the table's medians divided (the table rounds medians to 0.1 img/s).
    low, high = ratio_bounds(ours, plain)
    assert low <= float(summary.group(1)) <= high
    low, high = ratio_bounds(ours, seed)
    assert low <= float(summary.group(2)) <= high
    assert "warm-up=4 images per method" in lines[0]
    assert lines[1] == "precision: (a) and (b) fp32, (c) fp32 (compute.precision=fp32)"

    model_line = MODEL_ONLY.match(lines[-3])  # then the chart's path and the summary
    assert model_line, lines[-3]
    steady, percent, alone = float(model_line.group(1)), int(model_line.group(2)), float(model_line.group(3))
    # The percentage comes from the unrounded rates: compare it with what the printed (rounded) ones allow.
    low, high = ratio_bounds(steady, alone, printed_to=0)
    assert steady > 0 and alone > 0 and 100 * low - 0.5 <= percent <= 100 * high + 0.5, (steady, percent, alone)
    assert "model-only" in result.stderr

    chart = tmp_path / "bench-resnet18-cpu-12.png"
    assert chart.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "bench-resnet18-cpu-12.txt").read_text().splitlines()[-1] == lines[-1]
    for method in METHODS:
        assert f"warm-up {method}" in result.stderr


def test_the_commit_stage_measures_the_driver_ceiling_against_s3() -> None:
    result = CliRunner().invoke(app, ["bench", "--stage", "commit", "--images", "3000", "--shard-rows", "1000"])
    assert result.exit_code == 0, result.output
    assert "3,000 rows in 3 shards" in result.output and "moto S3 on 127.0.0.1" in result.output
    assert "rows/s" in result.output and "48,000 rows/s" in result.output


def test_the_inputs_stage_runs_n_and_10n_of_a_kind_and_prints_the_ratios(tmp_path: Path) -> None:
    """Two real `batchinfer run`s (5 and 50 files) in their own processes: the table and one ratio line."""
    result = CliRunner().invoke(
        app,
        ["bench", "--stage", "inputs", "--kinds", "files", "--scale", "0.0005", "--out", str(tmp_path)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    table_row = re.compile(r"^files\s+[\d,]+\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+[\d,]+$")
    rows = [line.split() for line in result.output.splitlines() if table_row.match(line)]
    assert [(r[1], r[0]) for r in rows] == [("5", "files"), ("50", "files")]
    assert all(float(r[2].replace(",", "")) > 50 and 0 < float(r[3]) <= float(r[4]) for r in rows)
    line = r"^files: 10x the inputs -> driver peak RSS (\d+\.\d\d)x, time to first row (\d+\.\d\d)x$"
    ratio = re.search(line, result.output, re.M)
    assert ratio, result.output
    rss = [float(r[2].replace(",", "")) for r in rows]
    assert float(ratio.group(1)) == pytest.approx(rss[1] / rss[0], abs=0.02)  # printed RSS is rounded to 1 MiB


def test_the_inputs_bench_manifest_names_files_that_exist_from_a_relative_folder(tmp_path: Path, monkeypatch) -> None:
    """`batchinfer bench` works under build/bench (relative): the manifest's lines must still name the files."""
    from batchinfer_job.bench.inputs_bench import make_inputs

    monkeypatch.chdir(tmp_path)
    spec_input = make_inputs("manifest", 3, Path("bench"))
    lines = Path(str(spec_input["uri"])).read_text().splitlines()
    assert len(lines) == 3 and all(Path(line).is_absolute() and Path(line).is_file() for line in lines), lines


def test_a_bench_run_that_prints_more_than_a_pipe_holds_still_ends(tmp_path: Path) -> None:
    """The inputs bench waits with wait4 (peak RSS): a run printing 1 MiB must not block on its output."""
    from batchinfer_job.bench.inputs_bench import run_measured

    command = [sys.executable, "-c", "import sys; sys.stdout.write('x' * 2**20); sys.exit(3)"]
    code, usage = run_measured(command, tmp_path / "run.log")
    assert (code, (tmp_path / "run.log").stat().st_size) == (3, 2**20) and usage.ru_maxrss > 0
