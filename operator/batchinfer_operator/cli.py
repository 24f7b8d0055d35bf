"""`batchinfer`: run, validate, render and generate, from the same YAML users `kubectl apply`."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import typer
import yaml

from batchinfer_job.documents import SpecError, load_batchinferences

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

CLASS_OPTION = typer.Option(
    None,
    "--class",
    help="BatchInferenceClass YAML file or folder of them (repeatable): applied as the operator applies it; "
    "the default-annotated class applies when a document names none.",
)


def _fail(problems: list[str]) -> None:
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    raise typer.Exit(code=1)


def _classes(paths: list[Path] | None) -> list[Any]:
    from batchinfer_job.classes import load_classes

    try:
        return load_classes(paths or [])
    except SpecError as err:
        _fail(err.problems)
        raise  # unreachable: _fail exits


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="BatchInference YAML files."),
    class_files: list[Path] | None = CLASS_OPTION,
) -> None:
    """Check files against the schema; print every problem with its field path (exit 1 on any).

    Accepts and refuses exactly what `run` and `render` do; local output paths are also checked against the
    working directory, the home directory and the inputs, as `run` checks them.
    """
    from batchinfer_job.locations import LocationError, check_local_paths

    classes = _classes(class_files)
    problems: list[str] = []
    for path in files:
        try:
            documents = load_batchinferences(path, classes)
        except SpecError as err:
            problems += err.problems
            continue
        for document in documents:
            try:
                check_local_paths(document.spec)
            except LocationError as err:
                problems.append(f"{path}: {document.metadata.name}: {err}")
    if problems:
        _fail(problems)
    typer.echo(f"ok: {len(files)} file(s) valid")


@app.command()
def run(
    file: Path = typer.Argument(..., help="A BatchInference YAML file (each document in it runs in turn)."),
    class_files: list[Path] | None = CLASS_OPTION,
) -> None:
    """Run a BatchInference locally on an embedded Ray (127.0.0.1) and print a summary."""
    documents = _load(file, _classes(class_files))
    from batchinfer_job.local import job_failures, run_local, summary_lines
    from batchinfer_job.summary import output_summary_lines

    for document in documents:
        try:
            result = run_local(document.spec)
        except job_failures() as err:
            _fail([f"BatchInference {document.metadata.name} failed: {type(err).__name__}: {err}"])
        typer.echo(f"BatchInference {document.metadata.name}: done")
        for line in summary_lines(result) + output_summary_lines(result.output_uri):
            typer.echo(line)


def _load(path: Path, classes: list[Any]) -> list:
    try:
        return load_batchinferences(path, classes)
    except SpecError as err:
        _fail(err.problems)
        raise  # unreachable: _fail exits


@app.command()
def render(
    files: list[Path] = typer.Argument(..., help="BatchInference YAML files."),
    namespace: str = typer.Option("default", help="Namespace when the document names none."),
    class_files: list[Path] | None = CLASS_OPTION,
) -> None:
    """Print exactly what the operator would create (multi-document YAML; it adds ownerReferences)."""
    from batchinfer_job.spec import is_dns_label
    from batchinfer_operator.render import Owner, render_children
    from batchinfer_operator.settings import OperatorSettings

    if not is_dns_label(namespace):
        _fail([f"--namespace {namespace!r} is not a Kubernetes namespace name: lowercase letters, digits and '-'"])
    settings = OperatorSettings.from_env()
    classes = _classes(class_files)
    out: list[dict] = []
    for path in files:
        for document in _load(path, classes):
            owner = Owner(name=document.metadata.name, namespace=document.metadata.namespace or namespace)
            out += render_children(document.spec, owner, settings)
    sys.stdout.write(yaml.dump_all(out, Dumper=_BlockDumper, sort_keys=False, width=120))


def _block_strings(dumper: Any, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the job spec in the ConfigMap) as readable literal blocks."""


_BlockDumper.add_representer(str, _block_strings)


@app.command()
def crd(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    kind: Literal["BatchInference", "BatchInferenceClass"] = typer.Option("BatchInference", help="Which CRD."),
) -> None:
    """Print a CRD generated from the schema (BatchInference, or BatchInferenceClass)."""
    from batchinfer_operator.crd import crd_yaml

    text = crd_yaml(f"{kind.lower()}.yaml")
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


@app.command("docs")
def docs(readme: Path = typer.Option(Path("README.md"), help="README to update in place.")) -> None:
    """Regenerate the spec reference section of the README from the schema."""
    from batchinfer_operator.reference import replace_reference

    readme.write_text(replace_reference(readme.read_text()))


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@app.command()
def bench(
    images: int = typer.Option(1000, help="Images in the seeded benchmark set."),
    model: str | None = typer.Option(None, help="torchvision model (default resnet18 on CPU, resnet152 on GPU)."),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", help="Where models run."),
    repeats: int = typer.Option(5, min=1, help="Timed runs of each method, interleaved (medians are reported)."),
    batch_size: int | None = typer.Option(
        None, help="Images per model call for every method (default: 256 on a GPU, as the job's; 32 on a CPU)."
    ),
    warmup_images: int = typer.Option(64, min=1, help="Untimed warm-up run of each method on this many images."),
    precision: Literal["auto", "fp32", "bf16", "fp16"] = typer.Option(
        "auto", help="pipeline stage: batchinfer's compute.precision (the plain loop and the seed stay fp32)."
    ),
    stage: Literal["pipeline", "predictor", "commit", "inputs"] = typer.Option(
        "pipeline",
        help="pipeline (a/b/c with Ray), predictor (no Ray; GPU hosts), commit (the driver's rows/s ceiling: "
        "labels, shards and commit records, to moto S3 unless --output-uri is given) or inputs (driver peak RSS "
        "and time to first row for N and 10N inputs of each input kind).",
    ),
    methods: str = typer.Option(
        "plain,seed,batchinfer",
        help="pipeline stage: which of (a) plain, (b) seed, (c) batchinfer to run, comma-separated (batchinfer "
        "always; e.g. only batchinfer for a quick GPU check of its model-only ratio).",
    ),
    decode: Literal["auto", "tasks", "device"] = typer.Option(
        "auto", help="pipeline stage: batchinfer's compute.decode (auto: device on a GPU, tasks on a CPU)."
    ),
    optimize: Literal["auto", "eager", "torchscript", "compile"] = typer.Option(
        "auto", help="pipeline stage: batchinfer's compute.optimize (compile: measured once compiled)."
    ),
    scale: float = typer.Option(1.0, help="inputs stage: multiply every case's rows (1.0: the sizes of issue 11)."),
    kinds: str = typer.Option(
        "parquet-bytes,parquet-paths,files", help="inputs stage: which input kinds, comma-separated."
    ),
    output_uri: str | None = typer.Option(None, help="commit stage: where shards go (default: a moto S3 server)."),
    shard_rows: int = typer.Option(1024, help="commit stage: rows per shard (spec.output.shardRows)."),
    out: Path = typer.Option(Path("build/bench"), help="Images, chart and results go here."),
) -> None:
    """Measure batchinfer against a plain PyTorch loop and the seed Ray Data recipe (prints ratios)."""
    gpu_default = device == "cuda" or (device == "auto" and stage in ("pipeline", "predictor") and _has_cuda())
    batch_size = batch_size or (256 if gpu_default else 32)
    if stage == "inputs":
        from batchinfer_job.bench.inputs_bench import run_inputs_bench
        from batchinfer_job.bench.inputs_bench import table as inputs_table

        results = run_inputs_bench(out / "inputs", kinds.split(","), scale, log=lambda m: typer.echo(m, err=True))
        for line in inputs_table(results):
            typer.echo(line)
        return
    if stage == "commit":
        from batchinfer_job.bench.commit_bench import moto_s3, run_commit_bench

        with moto_s3() if output_uri is None else nullcontext(output_uri) as uri:
            ceiling = run_commit_bench(uri, rows=images, shard_rows=shard_rows, batch=batch_size)
        for line in ceiling.lines("moto S3 on 127.0.0.1" if output_uri is None else uri):
            typer.echo(line)
        return
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if stage == "predictor":
        from batchinfer_job.bench.predictor_bench import run_predictor_bench, stage_table

        rows = run_predictor_bench(
            models=(model,) if model else ("resnet152", "resnet50"),
            precisions=("fp32", "bf16"),
            modes=("eager", "compile") if device == "cuda" else ("eager", "torchscript"),
            device=device,
            images=images,
            batch=batch_size,
            folder=out,
        )
        for line in stage_table(rows, device):
            typer.echo(line)
        return
    from batchinfer_job.bench.pipeline_bench import BenchConfig, bar_chart, run_pipeline_bench, summary_line, table

    try:
        config = BenchConfig(
            images=images,
            model=model or ("resnet152" if device == "cuda" else "resnet18"),
            device=device,
            repeats=repeats,
            batch_size=batch_size,
            warmup_images=warmup_images,
            precision=precision,
            decode=decode,
            optimize=optimize,
            folder=out,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--methods") from None
    result = run_pipeline_bench(config, log=lambda line: typer.echo(line, err=True))
    lines = table(result)
    stem = out / f"bench-{config.model}-{config.device}-{images}"
    stem.with_suffix(".txt").write_text("\n".join([*lines, summary_line(result)]))
    for line in lines:  # printed before the chart is drawn, so a failing chart loses no measurement
        typer.echo(line)
    typer.echo(f"chart: {bar_chart(result, stem.with_suffix('.png'))}")
    typer.echo(summary_line(result))


@app.command("demo-data")
def demo_data(
    target: str = typer.Argument(..., help="Folder to fill with photos, or an object-store URI (s3://bucket/prefix)."),
    per_photo: int = typer.Option(40, help="Variants per source photo."),
) -> None:
    """Write the quickstart's input images (real photos, varied, plus one corrupt file)."""
    import tempfile

    from batchinfer_job import storage
    from batchinfer_job.demo_data import write_demo_images

    location = storage.resolve(target)
    local = storage.is_local(location)
    if local and Path(location.path).exists() and not Path(location.path).is_dir():
        _fail([f"{target} is a file, not a folder; give a folder to write the photos into (it is created)"])
    try:
        if local:
            written = write_demo_images(Path(location.path), per_photo=per_photo)
        else:
            with tempfile.TemporaryDirectory() as folder:
                written = write_demo_images(Path(folder), per_photo=per_photo)
                storage.upload_files(location, written)
    except OSError as err:
        _fail([f"cannot write the photos to {target}: {err.strerror or err}"])
        raise  # unreachable: _fail exits
    typer.echo(f"wrote {len(written)} files to {target}")


@app.command()
def results(
    output: str = typer.Argument(..., help="A BatchInference's output.uri (a folder or s3://bucket/prefix)."),
) -> None:
    """Summarise a finished job's output: rows, errors, labels per input group and the first error rows."""
    from batchinfer_job.commit import NotCommittedError, read_success
    from batchinfer_job.summary import output_summary_lines

    try:
        record = read_success(output)
        lines = output_summary_lines(output)
    except NotCommittedError as err:
        _fail([str(err)])
        raise  # unreachable: _fail exits
    counts = record["counts"]
    typer.echo(f"{output}: {counts['total']} inputs, {counts['succeeded']} predicted, {counts['failed']} error rows")
    for line in lines:
        typer.echo(line)


if __name__ == "__main__":
    app()
