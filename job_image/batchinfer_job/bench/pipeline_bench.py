"""Whole-pipeline benchmark: (a) plain loop, (b) seed recipe, (c) batchinfer — same model, images, device."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    decode: str = "auto"  # batchinfer's compute.decode
    optimize: str = "auto"  # batchinfer's compute.optimize (compile: the model-only rate is the compiled one's)
    folder: Path = Path("build/bench")
    methods: tuple[str, ...] = METHODS  # which of (a), (b), (c) to run; (c) always (e.g. GPU checks: only c)

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or "batchinfer" not in self.methods:
            raise ValueError(f"methods {sorted(self.methods)}: choose from {', '.join(METHODS)}, with batchinfer")

    @property
    def chosen(self) -> list[str]:
        """The methods to run, in the table's order."""
        return [m for m in METHODS if m in self.methods]


@dataclass
class BenchResult:
    config: BenchConfig
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {m: [] for m in METHODS})
    batchinfer_dtype: str = "fp32"  # what batchinfer's precision resolved to on this host
    runs: list[Any] = field(default_factory=list)  # batchinfer's RunResults of the timed repeats
    model_only: float | None = None  # the same predictor alone, in this process: uint8 batches on the device
    decode: str = "tasks"  # what batchinfer's compute.decode resolved to

    def steady(self) -> float | None:
        """batchinfer's median rows/s after its first committed shard (start-up excluded)."""
        rates = [r.steady_rows_per_second for r in self.runs if r.steady_rows_per_second]
        return statistics.median(rates) if rates else None

    def first_row(self) -> float | None:
        """batchinfer's median seconds from the job's start to its first prediction."""
        times = [r.time_to_first_row for r in self.runs if r.time_to_first_row is not None]
        return statistics.median(times) if times else None

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
            # Shards of a tenth of the images: the steady-state rate (after the first shard) covers most of the run.
            "output": {
                "uri": str(output_dir),
                "mode": "overwrite",
                "shardRows": max(config.batch_size, config.images // 10),
            },
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
                "decode": config.decode,
                "optimize": config.optimize,
            },
        }
    )


def method_runs(
    config: BenchConfig, paths: list[Path], output_dir: Path, runs: list[Any] | None = None
) -> dict[str, Callable[[], int]]:
    """One callable per method over the same images; each returns the number of images it predicted.
    batchinfer's RunResults go into `runs` (time to first row, steady-state rows/s)."""
    from batchinfer_job.pipeline import run_pipeline

    spec = batchinfer_spec(config, paths[0].parent, output_dir)
    kept = [] if runs is None else runs

    def batchinfer() -> int:
        kept.append(run_pipeline(spec))
        return int(kept[-1].total)

    return {
        "plain": lambda: plain_loop(paths, config.model, config.device, config.batch_size),
        "seed": lambda: seed_recipe(paths, config.model, config.device, config.batch_size, actors=1),
        "batchinfer": batchinfer,
    }


def model_only_rate(config: BenchConfig) -> float:
    """batchinfer's predictor alone, built as its actor builds it, on uint8 batches already on the device."""
    from batchinfer_job.bench.predictor_bench import model_only
    from batchinfer_job.predictor import PredictorConfig, TorchPredictor

    spec = batchinfer_spec(config, Path("in"), Path("out"))  # paths unused: only its model and compute
    predictor = TorchPredictor(
        PredictorConfig(
            model=spec.model.model_dump(mode="json", exclude_none=True),
            device=config.device,
            precision=config.precision,
            threads=spec.compute.torchThreads or 1,
            optimize=spec.compute.optimize,
            batch_rows=config.batch_size,
        )
    )
    predictor.wait_compiled()  # optimize=compile: measure the compiled model, as a long job runs it
    return model_only(predictor, config.batch_size, batches=max(3, min(config.images, 2048) // config.batch_size))


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
    from batchinfer_job.pipeline import decode_mode

    result = BenchResult(config, batchinfer_dtype=resolved_precision(config))
    result.decode = decode_mode(batchinfer_spec(config, folder / "in", folder / "out"))
    with tempfile.TemporaryDirectory() as out:
        for method, run in method_runs(config, warmup_paths, Path(out) / "warmup").items():
            if method not in config.methods:
                continue
            log(f"warm-up {method:10s} {timed(run).images_per_second:7.1f} img/s ({len(warmup_paths)} images, untimed)")
        runs = method_runs(config, paths, Path(out) / "predictions", result.runs)
        for repeat in range(config.repeats):
            for method in config.chosen:
                sample = timed(runs[method])
                if sample.images != config.images:
                    raise RuntimeError(f"{method} predicted {sample.images} of {config.images} images")
                result.samples[method].append(sample)
                log(
                    f"repeat {repeat + 1}/{config.repeats} {method:10s} {sample.images_per_second:7.1f} img/s "
                    f"({sample.seconds:.1f} s, peak RSS {sample.peak_rss / 2**20:.0f} MiB)"
                )
    result.model_only = model_only_rate(config)  # after the runs: nothing else is using the cores
    log(f"model-only {result.model_only:7.1f} img/s (batchinfer's predictor in this process)")
    return result


def table(result: BenchResult) -> list[str]:
    c = result.config
    plain = result.median("plain") if "plain" in c.methods else None
    lines = [
        f"model={c.model} device={c.device} images={c.images} repeats={c.repeats} batch={c.batch_size} "
        f"cpus={os.cpu_count()} warm-up={c.warmup_images} images per method (untimed)",
        f"precision: (a) and (b) fp32, (c) {result.batchinfer_dtype} (compute.precision={c.precision})",
        f"{'method':26s} {'img/s (median)':>14s} {'spread (min-max)':>18s} {'vs plain':>9s} {'peak RSS MiB':>13s}",
    ]
    for method in c.chosen:
        low, high = result.spread(method)
        ratio = f"{result.median(method) / plain:8.2f}x" if plain else f"{'-':>9s}"
        lines.append(
            f"{LABELS[method]:26s} {result.median(method):14.1f} {f'{low:.1f}-{high:.1f}':>18s} "
            f"{ratio} {result.peak_rss_mib(method):13.0f}"
        )
    return lines + model_only_lines(result)


def model_only_lines(result: BenchResult) -> list[str]:
    """(c) against its own model alone, both from this run: how much of the model's rate the pipeline keeps."""
    steady, first_row = result.steady(), result.first_row()
    if result.model_only is None or steady is None:
        return []
    decoder = ""
    if result.decode == "device":  # the actors pick it as this process does (same environment, same packages)
        from batchinfer_job.device_decode import JPEG_DECODER_NAME

        decoder = f" decoder={JPEG_DECODER_NAME}"
    return [
        f"(c) decode={result.decode}{decoder} optimize={result.config.optimize}: steady state {steady:.1f} img/s "
        "(after the first shard, median) = "
        f"{100 * steady / result.model_only:.0f}% of model-only {result.model_only:.1f} img/s"
        + ("" if first_row is None else f"; time to first row {first_row:.1f} s (median)")
    ]


def summary_line(result: BenchResult) -> str:
    """The last line scripts read: batchinfer's speed-up over each baseline that ran (or its rate alone)."""
    ours = result.median("batchinfer")
    ratios = [f"speedup_vs_{m}={ours / result.median(m):.2f}" for m in ("plain", "seed") if m in result.config.methods]
    return " ".join(ratios) or f"batchinfer_images_per_second={ours:.1f}"


def bar_chart(result: BenchResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result.config.chosen
    medians = [result.median(m) for m in methods]
    lows = [medians[i] - result.spread(m)[0] for i, m in enumerate(methods)]
    highs = [result.spread(m)[1] - medians[i] for i, m in enumerate(methods)]
    colours = {"plain": "#999", "seed": "#c96", "batchinfer": "#369"}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([LABELS[m] for m in methods], medians, yerr=[lows, highs], color=[colours[m] for m in methods], capsize=6)
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
