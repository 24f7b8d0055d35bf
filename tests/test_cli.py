"""The `batchinfer` CLI: validate names every bad field; crd prints the generated CRD."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from batchinfer_job.classes import load_classes
from batchinfer_job.documents import SpecError, load_batchinferences
from batchinfer_job.spec import job_gpus
from batchinfer_operator.cli import app
from tests.helpers import document

runner = CliRunner()
SAMPLES = sorted(Path("manifests/samples").glob("*.yaml"))


def write(tmp_path: Path, name: str, body: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def readme_command(prefix: str) -> str:
    (line,) = [ln for ln in Path("README.md").read_text().splitlines() if ln.startswith(prefix)]
    return line


@pytest.mark.parametrize("prefix", ["batchinfer validate manifests/samples/", "batchinfer render manifests/samples/"])
def test_the_readmes_validate_and_render_commands_accept_the_samples_as_written(prefix: str) -> None:
    """Verbatim, through a shell (its glob), with the sample classes as `kubectl apply -f` would install them."""
    command = readme_command(prefix)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, command + "\n" + result.stdout + result.stderr
    assert len(SAMPLES) >= 6


def test_every_sample_is_valid_under_the_sample_classes_and_each_is_needed(tmp_path: Path) -> None:
    """Samples and sample classes agree: each sample validates with the folder of classes; the GPU samples name
    the `gpu` class and the others fall under the default `cpu` class, which would refuse a GPU sample."""
    classes = load_classes([Path("manifests/samples/classes")])
    assert {c.name for c in classes} == {"cpu", "gpu", "gpu-a100"}
    for sample in SAMPLES:
        (doc,) = load_batchinferences(sample, classes)
        assert doc.spec.className is not None or job_gpus(doc.spec) == 0, sample  # the default class: CPU only
    body = yaml.safe_load(Path("manifests/samples/weights-uri.yaml").read_text())
    del body["spec"]["className"]
    with pytest.raises(SpecError, match="maxGpusPerJob"):
        load_batchinferences(write(tmp_path, "no-class.yaml", body), classes)


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
    assert result.stdout == Path("manifests/crds/batchinference.yaml").read_text()


def test_readme_spec_reference_is_generated_from_the_schema() -> None:
    from batchinfer_operator.reference import replace_reference

    readme = Path("README.md").read_text()
    assert replace_reference(readme) == readme, "README spec reference drifted: run `make docs`"
    assert "| `spec.model.torchvision.name` | string (one of" in readme


def test_two_batchinferences_with_one_name_in_a_file_are_refused(tmp_path: Path) -> None:
    one = document({"model": {"packaged": "efficientnet_lite0"}, "input": {"uri": "in/"}, "output": {"uri": "a/"}})
    other = {**one, "spec": {**one["spec"], "output": {"uri": "b/"}}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all([one, other]))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    name = one["metadata"]["name"]
    assert f"metadata.name {name!r} is used by 2 BatchInferences; kubectl apply would keep only the last" in (
        result.output
    )
    other["metadata"] = {**one["metadata"], "namespace": "elsewhere"}  # same name, another namespace: fine
    path.write_text(yaml.safe_dump_all([one, other]))
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0


@pytest.mark.parametrize(
    ("section", "value", "expect"),
    [
        ("scheduling", {"nodeSelector": {"bad key!": "x"}}, "'bad key!' is not a Kubernetes label key"),
        ("scheduling", {"nodeSelector": {"pool": "not valid!"}}, "'not valid!' is not a Kubernetes label value"),
        ("scheduling", {"head": {"nodeSelector": {"-x": "y"}}}, "'-x' is not a Kubernetes label key"),
        ("cluster", {"serviceAccountName": "default"}, "cluster.serviceAccountName 'default' is the account of every"),
        ("cluster", {"image": "Registry/ml job"}, "is not an image reference"),
        ("storage", {"secretRef": {"name": "Not_A_Valid_Name"}}, "is not a Kubernetes object name"),
    ],
)
def test_validate_holds_names_to_the_kubernetes_grammar(tmp_path: Path, section: str, value: dict, expect: str) -> None:
    body = document({"model": {"packaged": "efficientnet_lite0"}, "input": {"uri": "in/"}, "output": {"uri": "out/"}})
    body["spec"][section] = value
    result = runner.invoke(app, ["validate", str(write(tmp_path, "bad.yaml", body))])
    assert result.exit_code == 1 and expect in result.output, result.output
    assert "Traceback" not in result.output


def test_render_refuses_a_namespace_kubernetes_would_refuse() -> None:
    result = runner.invoke(app, ["render", "manifests/samples/quickstart.yaml", "--namespace", "Bad Namespace!"])
    assert result.exit_code == 1
    assert "--namespace 'Bad Namespace!' is not a Kubernetes namespace name" in result.output


def test_valid_names_pass() -> None:
    from batchinfer_job.spec import IMAGE_REFERENCE, LABEL_KEY

    for image in (
        "rayproject/ray:2.60.0-py311-cpu",
        "registry.example.com:5000/ml/batchinfer-job:0.1.0",
        "Registry.Example.com/ml/job@sha256:" + "a" * 64,
        "localhost/x",
        "batchinfer.local/batchinfer-operator:dev",
    ):
        assert IMAGE_REFERENCE.match(image), image
    for key in ("nvidia.com/gpu.present", "kubernetes.io/hostname", "pool", "a.b-c_d"):
        assert LABEL_KEY.match(key), key


def test_demo_data_onto_an_existing_file_says_so_in_one_line(tmp_path: Path) -> None:
    target = tmp_path / "photos"
    target.write_text("not a folder")
    result = runner.invoke(app, ["demo-data", str(target)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: {target} is a file, not a folder; give a folder" in result.output
    assert target.read_text() == "not a folder"  # nothing lost
