"""The `batchinfer` CLI: validate names every bad field; crd prints the generated CRD."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from batchinfer_operator.cli import app
from tests.helpers import document

runner = CliRunner()
SAMPLES = sorted(Path("manifests/samples").glob("*.yaml"))


def write(tmp_path: Path, name: str, body: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def test_validate_accepts_every_sample() -> None:
    result = runner.invoke(app, ["validate", *map(str, SAMPLES), "--class", "manifests/samples/classes/gpu-a100.yaml"])
    assert result.exit_code == 0, result.output
    assert SAMPLES


def test_validate_names_each_bad_field(tmp_path: Path) -> None:
    bad = document(
        {
            "model": {"torchvision": {"name": "resnet50"}, "packaged": "efficientnet_lite0"},
            "input": {"uri": "ftp://host/in", "format": "videos"},
            "output": {"uri": "s3://b/out", "topK": 0, "mode": "append"},
            "compute": {"minActors": 4, "maxActors": 2},
            "batching": {"batchSize": -1, "bacthSize": 3},
        }
    )
    result = runner.invoke(app, ["validate", str(write(tmp_path, "bad.yaml", bad))])
    assert result.exit_code == 1
    out = result.output
    for expected in [
        "spec.model: model needs exactly one of torchvision, weightsUri, packaged, predictor; "
        "got torchvision, packaged",
        "spec.input.uri: input.uri has unsupported scheme 'ftp'",
        "spec.input.format: Input should be 'images', 'parquet' or 'manifest'",
        "spec.output.topK: Input should be greater than or equal to 1",
        "spec.output.mode: Input should be 'error_if_exists' or 'overwrite'",
        "spec.compute: compute.minActors (4) must not exceed compute.maxActors (2)",
        "spec.batching.batchSize: Input should be greater than or equal to 1",
        "spec.batching.bacthSize: unknown field; remove it or check its spelling",
    ]:
        assert expected in out, f"missing {expected!r} in:\n{out}"


def test_validate_reports_missing_sections_and_bad_yaml(tmp_path: Path) -> None:
    missing = write(tmp_path, "missing.yaml", document({"model": {"packaged": "efficientnet_lite0"}}))
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = runner.invoke(app, ["validate", str(missing), str(broken)])
    assert result.exit_code == 1
    assert "spec.input: Field required" in result.output
    assert "spec.output: Field required" in result.output
    assert "broken.yaml: not valid YAML" in result.output


def test_crd_command_prints_the_committed_crd() -> None:
    result = runner.invoke(app, ["crd"])
    assert result.exit_code == 0
    assert result.output == Path("manifests/crds/batchinference.yaml").read_text()


def test_readme_spec_reference_is_generated_from_the_schema() -> None:
    from batchinfer_operator.reference import replace_reference

    readme = Path("README.md").read_text()
    assert replace_reference(readme) == readme, "README spec reference drifted: run `make docs`"
    assert "| `spec.model.torchvision.name` | string (one of" in readme
