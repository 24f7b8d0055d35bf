"""Whole-pipeline benchmark: (a) plain loop, (b) seed recipe, (c) batchinfer — same model, images, device."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from batchinfer_job.bench.baselines import plain_loop, seed_recipe
from batchinfer_job.bench.images import make_image_set
from batchinfer_job.bench.measure import Sample, timed
from batchinfer_job.spec import BatchInferenceSpec

METHODS = ("plain", "seed", "batchinfer")
LABELS = {"plain": "(a) plain PyTorch loop", "seed": "(b) seed Ray Data recipe", "batchinfer": "(c) batchinfer"}


@dataclass(frozen=True)
class BenchConfig:
    images: int = 1000
    model: str = "resnet18"
    device: str = "cpu"
    repeats: int = 5
    batch_size: int = 32
    warmup_images: int = 64  # per method, untimed, before the timed repeats
    precision: str = "auto"  # batchinfer's compute.precision; (a) and (b) run fp32 as the seed recipe does
    folder: Path = Path("build/bench")


@dataclass
class BenchResult:
    config: BenchConfig
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {m: [] for m in METHODS})
    batchinfer_dtype: str = "fp32"  # what batchinfer's precision resolved to on this host

    def median(self, method: str) -> float:
        return statistics.median(s.images_per_second for s in self.samples[method])

    def spread(self, method: str) -> tuple[float, float]:
        rates = [s.images_per_second for s in self.samples[method]]
        return min(rates), max(rates)

    def peak_rss_mib(self, method: str) -> float:
        return max(s.peak_rss for s in self.samples[method]) / 2**20


def batchinfer_spec(config: BenchConfig, input_dir: Path, output_dir: Path) -> BatchInferenceSpec:
    """batchinfer's settings for this machine: one model actor whose torch threads may use every core,
    decode tasks beside it (on CPU), or one actor per GPU."""
    cpus = os.cpu_count() or 1
    gpu = config.device == "cuda"
    return BatchInferenceSpec.model_validate(
        {
            "model": {"torchvision": {"name": config.model, "weights": "NONE"}},
            "input": {"uri": str(input_dir)},
            "output": {"uri": str(output_dir), "mode": "overwrite"},
            "batching": {"batchSize": config.batch_size},
            "compute": {
                "device": config.device,
                "minActors": 1,
                "maxActors": 1,
                "gpusPerActor": 1 if gpu else 0,
                "cpusPerActor": 1,
                "preprocessCpus": 1,
                "torchThreads": cpus,
                "precision": config.precision,
            },
        }
    )


def method_runs(config: BenchConfig, paths: list[Path], output_dir: Path) -> dict[str, Callable[[], int]]:
    """One callable per method over the same images; each returns the number of images it predicted."""
    from batchinfer_job.pipeline import run_pipeline

    spec = batchinfer_spec(config, paths[0].parent, output_dir)
    return {
        "plain": lambda: plain_loop(paths, config.model, config.device, config.batch_size),
        "seed": lambda: seed_recipe(paths, config.model, config.device, config.batch_size, actors=1),
        "batchinfer": lambda: run_pipeline(spec).total,
    }


def resolved_precision(config: BenchConfig) -> str:
    """The dtype batchinfer's actors will pick for `config.precision` on this host (e.g. auto → bf16 with AMX)."""
    from batchinfer_job.predictor import PRECISION_NAMES, pick_device, resolve_dtype

    return PRECISION_NAMES[resolve_dtype(config.precision, pick_device(config.device))]


def run_pipeline_bench(config: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Warm up every method once on a small set (untimed), then time them in turn, `repeats` times.

    The warm-up keeps one-time costs of this process (Ray Data's system actors, thread pools, the page cache)
    off whichever method happens to run first; every timed run still starts its own model and Ray actors.
    """
    from batchinfer_job.local import start_local_ray

    start_local_ray()
    folder = config.folder.resolve()  # Ray's workers start in a folder of their own: relative paths miss
    paths = make_image_set(folder / f"images-{config.images}", config.images)
    warmup_paths = make_image_set(folder / f"warmup-{config.warmup_images}", config.warmup_images, seed=1)
    result = BenchResult(config, batchinfer_dtype=resolved_precision(config))
    with tempfile.TemporaryDirectory() as out:
        for method, run in method_runs(config, warmup_paths, Path(out) / "warmup").items():
            log(f"warm-up {method:10s} {timed(run).images_per_second:7.1f} img/s ({len(warmup_paths)} images, untimed)")
        runs = method_runs(config, paths, Path(out) / "predictions")
        for repeat in range(config.repeats):
            for method in METHODS:
                sample = timed(runs[method])
                if sample.images != config.images:
                    raise RuntimeError(f"{method} predicted {sample.images} of {config.images} images")
                result.samples[method].append(sample)
                log(
                    f"repeat {repeat + 1}/{config.repeats} {method:10s} {sample.images_per_second:7.1f} img/s "
                    f"({sample.seconds:.1f} s, peak RSS {sample.peak_rss / 2**20:.0f} MiB)"
                )
    return result


def table(result: BenchResult) -> list[str]:
    c = result.config
    plain = result.median("plain")
    lines = [
        f"model={c.model} device={c.device} images={c.images} repeats={c.repeats} batch={c.batch_size} "
        f"cpus={os.cpu_count()} warm-up={c.warmup_images} images per method (untimed)",
        f"precision: (a) and (b) fp32, (c) {result.batchinfer_dtype} (compute.precision={c.precision})",
        f"{'method':26s} {'img/s (median)':>14s} {'spread (min-max)':>18s} {'vs plain':>9s} {'peak RSS MiB':>13s}",
    ]
    for method in METHODS:
        low, high = result.spread(method)
        lines.append(
            f"{LABELS[method]:26s} {result.median(method):14.1f} {f'{low:.1f}-{high:.1f}':>18s} "
            f"{result.median(method) / plain:8.2f}x {result.peak_rss_mib(method):13.0f}"
        )
    return lines


def summary_line(result: BenchResult) -> str:
    ours = result.median("batchinfer")
    return f"speedup_vs_plain={ours / result.median('plain'):.2f} speedup_vs_seed={ours / result.median('seed'):.2f}"


def bar_chart(result: BenchResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = [result.median(m) for m in METHODS]
    lows = [medians[i] - result.spread(m)[0] for i, m in enumerate(METHODS)]
    highs = [result.spread(m)[1] - medians[i] for i, m in enumerate(METHODS)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([LABELS[m] for m in METHODS], medians, yerr=[lows, highs], color=["#999", "#c96", "#369"], capsize=6)
    c = result.config
    ax.set_ylabel("images / second (median, min-max)")
    ax.set_title(f"{c.model} on {c.device}, {c.images} images, {c.repeats} repeats")
    for i, value in enumerate(medians):
        ax.text(i, value / 2, f"{value:.1f}", ha="center", va="center", color="white", fontweight="bold")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
