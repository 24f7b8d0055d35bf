"""BatchInferenceClass rules, as `batchinfer validate/render/run --class` and the operator apply them (one
function, `classes.resolve`): defaults, enforced fields, limits, the default class. The same rules on the real
control plane, through the operator: tests/test_cluster_classes.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from batchinfer_job import classes as c
from batchinfer_job.classes import ClassRejected, effective_spec, load_classes, parse_class
from batchinfer_job.documents import SpecError, parse_spec
from batchinfer_operator.changes import spec_hash
from batchinfer_operator.cli import app

SAMPLES = Path("manifests/samples")
GPU_CLASS = SAMPLES / "classes" / "gpu-a100.yaml"
CPU_CLASS = SAMPLES / "classes" / "cpu-default.yaml"
MINIMAL = {
    "model": {"packaged": "efficientnet_lite0"},
    "input": {"uri": "s3://b/in/"},
    "output": {"uri": "s3://b/out/"},
}
runner = CliRunner()


def load(path: Path) -> c.BatchInferenceClass:
    (cls,) = c.load_classes([path])
    return cls


def minimal(**extra: Any) -> dict[str, Any]:
    """The minimal sample's spec (model, input, output, className), with fields added."""
    spec = yaml.safe_load((SAMPLES / "minimal-with-class.yaml").read_text())["spec"]
    return {**spec, **extra}


def resolve(spec: dict[str, Any], *classes: c.BatchInferenceClass) -> Any:
    return c.resolve(spec, classes or (load(GPU_CLASS),))


def test_class_defaults_make_the_effective_spec() -> None:
    spec, name = resolve(minimal())
    assert name == "gpu-a100" and spec.className == "gpu-a100"
    assert spec.scheduling.nodeSelector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert spec.scheduling.queueName == "ml-batch" and spec.scheduling.priorityClassName == "batch-low"
    assert spec.cluster.image == "registry.example.com/ml/batchinfer-job:0.1.0"
    assert spec.cluster.workers.resources.gpu == 1 and spec.cluster.workers.replicas == 2
    assert spec.compute.device == "cuda" and spec.storage.secretRef and spec.storage.secretRef.name == "s3-credentials"
    assert spec.ttlSecondsAfterFinished == 300 and spec.backoffLimit == 1
    assert spec.activeDeadlineSeconds == 86400  # unset by both: the class's maximum applies
    assert spec.input.uri == "s3://ml-datasets/imagenet/val/"  # the BatchInference's own fields are kept


def test_overridable_fields_take_the_batchinference_value() -> None:
    spec, _ = resolve(
        minimal(
            cluster={"workers": {"replicas": 4, "minReplicas": 4, "maxReplicas": 4}},
            compute={"maxActors": 4},
            activeDeadlineSeconds=600,
        )
    )
    assert spec.cluster.workers.replicas == 4 and spec.cluster.workers.resources.gpu == 1  # merged, not replaced
    assert spec.compute.maxActors == 4 and spec.compute.device == "cuda"
    assert spec.activeDeadlineSeconds == 600


def test_setting_an_enforced_field_the_same_as_the_class_is_allowed() -> None:
    spec, _ = resolve(minimal(scheduling={"queueName": "ml-batch"}))
    assert spec.scheduling.queueName == "ml-batch"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"scheduling": {"nodeSelector": {"pool": "cheap"}}}, "spec.scheduling.nodeSelector"),
        ({"scheduling": {"queueName": "other-team"}}, "spec.scheduling.queueName"),
        ({"storage": {"secretRef": {"name": "team-b-keys"}}}, "spec.storage.secretRef.name"),
        ({"cluster": {"image": "registry.example.com/ml/mine:1"}}, "spec.cluster.image"),
        ({"cluster": {"workers": {"resources": {"gpu": 2}}}}, "spec.cluster.workers.resources.gpu"),
        ({"ttlSecondsAfterFinished": 0}, "spec.ttlSecondsAfterFinished"),
    ],
)
def test_an_enforced_field_is_refused_naming_field_and_class(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(c.ClassRejected) as caught:
        resolve(minimal(**extra))
    assert caught.value.reason == "EnforcedField" and not caught.value.waiting
    (problem,) = caught.value.problems
    assert problem.startswith(f"{field}:") and "'gpu-a100'" in problem and "spec.limits.overridable" in problem


@pytest.mark.parametrize(
    ("extra", "field", "limit"),
    [
        (
            {"cluster": {"workers": {"replicas": 9, "minReplicas": 9, "maxReplicas": 9}}},
            "spec.cluster",
            "maxGpusPerJob",
        ),
        ({"activeDeadlineSeconds": 90000}, "spec.activeDeadlineSeconds", "maxActiveDeadlineSeconds"),
        ({"input": {"uri": "s3://team-payroll/scans/"}}, "spec.input.uri", "allowedInputPrefixes"),
        ({"input": {"uri": "s3://ml-datasets-evil/x/"}}, "spec.input.uri", "allowedInputPrefixes"),
        ({"output": {"uri": "s3://team-vision/predictions/../models/"}}, "spec.output.uri", "allowedOutputPrefixes"),
        ({"output": {"uri": "s3://team-vision/elsewhere/"}}, "spec.output.uri", "allowedOutputPrefixes"),
        (
            {"model": {"weightsUri": "s3://someone-else/model.pt"}},
            "spec.model.weightsUri",
            "allowedWeightsPrefixes",
        ),
    ],
)
def test_each_limit_is_refused_naming_field_class_and_limit(extra: dict[str, Any], field: str, limit: str) -> None:
    with pytest.raises(c.ClassRejected) as caught:
        resolve(minimal(**extra))
    assert caught.value.reason == "ClassLimitExceeded"
    assert any(
        p.startswith(f"{field}:") and "'gpu-a100'" in p and f"spec.limits.{limit}" in p for p in caught.value.problems
    ), caught.value.problems


def test_worker_and_image_limits() -> None:
    cls = load(GPU_CLASS).model_copy(deep=True)
    document = yaml.safe_load(GPU_CLASS.read_text())
    document["spec"]["limits"]["overridable"] += ["cluster.image", "cluster.workers.resources"]
    document["spec"]["limits"]["maxGpusPerJob"] = 100
    cls = c.parse_class(document)
    spec = minimal(
        cluster={
            "image": "docker.io/evil/miner:latest",
            "workers": {"replicas": 9, "minReplicas": 9, "maxReplicas": 9, "resources": {"gpu": 0}},
        }
    )
    with pytest.raises(c.ClassRejected) as caught:
        resolve(spec, cls)
    fields = sorted(p.split(":")[0] for p in caught.value.problems)
    assert fields == ["spec.cluster.image", "spec.cluster.workers.maxReplicas"]
    assert any("spec.limits.maxWorkerReplicas" in p for p in caught.value.problems)
    assert any("spec.limits.allowedImagePrefixes" in p for p in caught.value.problems)


def test_the_default_class_applies_when_none_is_named_and_two_defaults_apply_none() -> None:
    cpu, gpu = load(CPU_CLASS), load(GPU_CLASS)
    unnamed = {k: v for k, v in minimal(output={"uri": "s3://b/out/"}).items() if k != "className"}
    spec, name = c.resolve(unnamed, [gpu, cpu])
    assert name == "cpu" and spec.compute.device == "cpu" and spec.activeDeadlineSeconds == 14400
    second = c.parse_class(
        {**yaml.safe_load(CPU_CLASS.read_text()), "metadata": {**cpu.metadata.model_dump(), "name": "cpu2"}}
    )
    with pytest.raises(c.ClassRejected) as caught:
        c.resolve(unnamed, [gpu, cpu, second])
    assert caught.value.reason == "AmbiguousDefaultClass" and caught.value.waiting
    assert "cpu, cpu2" in str(caught.value) and "spec.className" in str(caught.value)
    assert c.resolve(unnamed, [gpu])[1] is None  # no default: no class, the spec as written


def test_a_missing_class_is_named() -> None:
    with pytest.raises(c.ClassRejected) as caught:
        c.resolve(minimal(className="gpu-h100"), [load(GPU_CLASS)])
    assert caught.value.reason == "ClassNotFound" and caught.value.waiting
    assert "spec.className: BatchInferenceClass 'gpu-h100' does not exist (known: gpu-a100)" in str(caught.value)


def test_a_class_with_an_unknown_overridable_path_is_refused() -> None:
    document = yaml.safe_load(CPU_CLASS.read_text())
    document["spec"]["limits"]["overridable"] = ["compute", "model"]
    with pytest.raises(SpecError, match="overridable names fields a class cannot default: model"):
        c.parse_class(document)


def test_the_class_schema_is_the_batchinference_schema_made_optional() -> None:
    with pytest.raises(SpecError, match=r"spec\.defaults\.cluster\.workers\.maxReplicas"):
        c.parse_class(
            {
                **yaml.safe_load(CPU_CLASS.read_text()),
                "spec": {"defaults": {"cluster": {"workers": {"maxReplicas": -1}}}},
            }
        )
    with pytest.raises(SpecError, match=r"spec\.defaults\.compute\.device"):
        c.parse_class({**yaml.safe_load(CPU_CLASS.read_text()), "spec": {"defaults": {"compute": {"device": "tpu"}}}})


def test_rules_across_fields_run_on_the_effective_spec() -> None:
    document = yaml.safe_load(CPU_CLASS.read_text())
    document["spec"]["defaults"]["cluster"]["enableInTreeAutoscaling"] = True
    document["metadata"]["annotations"] = {}
    cls = c.parse_class(document)
    spec, _ = c.resolve(
        minimal(className="cpu", output={"uri": "s3://b/out/"}, cluster={"workers": {"maxReplicas": 4}}), [cls]
    )
    assert spec.cluster.workers.maxReplicas == 4  # autoscaling comes from the class
    with pytest.raises(c.ClassRejected, match=r"scheduling\.queueName and cluster\.enableInTreeAutoscaling") as caught:
        c.resolve(minimal(className="cpu", output={"uri": "s3://b/out/"}, scheduling={"queueName": "q"}), [cls])
    assert caught.value.reason == "SpecInvalid" and "'cpu'" in str(caught.value)


def test_the_accepted_hash_ignores_values_equal_to_the_schema_defaults() -> None:
    spec = minimal()
    filled = copy.deepcopy(spec)
    filled["output"] = {**filled["output"], "topK": 5, "mode": "error_if_exists"}
    filled["suspend"] = True
    assert spec_hash(spec) == spec_hash(filled)
    assert spec_hash(spec) != spec_hash({**spec, "output": {**spec["output"], "topK": 3}})


def test_validate_and_render_with_class_say_what_the_function_says(tmp_path: Path) -> None:
    bad = yaml.safe_load((SAMPLES / "minimal-with-class.yaml").read_text())
    bad["spec"]["scheduling"] = {"nodeSelector": {"pool": "cheap"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(c.ClassRejected) as caught:
        resolve(bad["spec"])
    for command in ("validate", "render"):
        result = runner.invoke(app, [command, str(path), "--class", str(GPU_CLASS)])
        assert result.exit_code == 1, result.output
        assert f"{path}: {caught.value.problems[0]}" in result.output
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "--class FILE" in result.output
    result = runner.invoke(app, ["render", str(SAMPLES / "minimal-with-class.yaml"), "--class", str(GPU_CLASS)])
    assert result.exit_code == 0, result.output
    rayjob = next(d for d in yaml.safe_load_all(result.stdout) if d["kind"] == "RayJob")
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-batch"


def test_class_files_must_hold_classes(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["validate", str(SAMPLES / "quickstart.yaml"), "--class", str(SAMPLES / "quickstart.yaml")]
    )
    assert result.exit_code == 1 and "is not a BatchInferenceClass" in result.output


def test_run_applies_the_class_before_anything_runs(tmp_path: Path) -> None:
    document = yaml.safe_load((SAMPLES / "quickstart.yaml").read_text())
    document["spec"]["className"] = "gpu-a100"
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(c.ClassRejected) as caught:
        resolve(document["spec"])
    result = runner.invoke(app, ["run", str(path), "--class", str(GPU_CLASS)])
    assert result.exit_code == 1
    assert all(problem in result.output for problem in caught.value.problems), result.output
    assert "spec.compute.device:" in result.output and "done" not in result.output


def test_a_batchinference_accepted_before_classes_still_takes_suspend_changes() -> None:
    import hashlib
    import json

    from batchinfer_job.documents import parse_spec
    from batchinfer_operator.changes import is_accepted

    spec = yaml.safe_load((SAMPLES / "quickstart.yaml").read_text())["spec"]
    old = parse_spec(spec).model_dump(mode="json", exclude={"suspend", "className"})  # what the old operator hashed
    stored = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert is_accepted({**spec, "suspend": True}, stored)
    assert not is_accepted({**spec, "output": {**spec["output"], "topK": 2}}, stored)


@pytest.mark.parametrize(
    "extra",
    [
        {"compute": {"device": "cuda", "gpusPerActor": 1}},  # the review's bypass: GPUs through the model actor
        {"compute": {"device": "auto", "gpusPerActor": 0.5}},
        {"cluster": {"workers": {"resources": {"cpu": "4", "memory": "8Gi", "gpu": 1}}}},
    ],
)
def test_every_way_to_ask_for_gpus_meets_the_class_gpu_cap(extra: dict[str, Any]) -> None:
    """One count of a job's GPUs (`spec.job_gpus`) for the limit and the renderer: a class with
    maxGpusPerJob: 0 refuses each way a spec can ask for a GPU."""
    with pytest.raises(c.ClassRejected) as caught:
        c.resolve({**minimal(**extra), "className": "cpu"}, [load(CPU_CLASS)])
    assert caught.value.reason == "ClassLimitExceeded"
    assert any("spec.limits.maxGpusPerJob" in p for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize(
    ("cluster", "compute", "expected"),
    [
        ({}, {"device": "cuda", "gpusPerActor": 1}, 1),
        ({"workers": {"replicas": 2, "minReplicas": 2, "maxReplicas": 2}}, {"gpusPerActor": 0.5}, 2),
        ({"workers": {"replicas": 3, "minReplicas": 3, "maxReplicas": 3, "resources": {"gpu": 2}}}, {}, 6),
        ({"head": {"cpu": "2", "memory": "4Gi", "gpu": 1}}, {}, 1),
    ],
)
def test_the_rendered_gpus_are_the_counted_gpus(cluster: dict, compute: dict, expected: int) -> None:
    from batchinfer_job.spec import BatchInferenceSpec, job_gpus
    from batchinfer_operator.render import Owner, render_rayjob
    from batchinfer_operator.settings import OperatorSettings

    spec = BatchInferenceSpec.model_validate({**minimal(cluster=cluster, compute=compute), "className": None})
    rayjob = render_rayjob(spec, Owner("x", "ns"), OperatorSettings())["spec"]["rayClusterSpec"]
    head = rayjob["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    (group,) = rayjob["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    rendered = head.get("nvidia.com/gpu", 0) + worker.get("nvidia.com/gpu", 0) * group["maxReplicas"]
    assert rendered == job_gpus(spec) == expected


@pytest.mark.parametrize(
    "endpoint", ["not a url", "ftp://minio:21", "http://", "http://a b:9000", "http://u:p@minio:9000", "http://m/?x=1"]
)
def test_an_endpoint_that_is_not_an_http_url_is_refused_naming_the_field(endpoint: str) -> None:
    with pytest.raises(SpecError, match=r"storage\.endpointUrl .* is not an endpoint URL; give http://host"):
        parse_spec({**MINIMAL, "storage": {"endpointUrl": endpoint}})


@pytest.mark.parametrize("endpoint", ["http://minio.minio.svc:9000", "https://s3.eu.example.com", "http://[::1]:9000"])
def test_endpoint_urls_with_host_and_port_are_accepted(endpoint: str) -> None:
    assert parse_spec({**MINIMAL, "storage": {"endpointUrl": endpoint}}).storage.endpointUrl == endpoint


def test_the_class_credentials_go_only_to_the_class_endpoint_or_an_allowed_one() -> None:
    """gpu-a100 provides Secret s3-credentials; storage is not overridable, but endpointUrl is not defaulted,
    so a user could once send those credentials to any endpoint (the instance metadata address, their own)."""
    gpu = load_classes([GPU_CLASS])[0]
    spec = yaml.safe_load((SAMPLES / "minimal-with-class.yaml").read_text())["spec"]
    with pytest.raises(ClassRejected) as refused:
        effective_spec({**spec, "storage": {"endpointUrl": "http://169.254.169.254/"}}, gpu)
    assert "spec.storage.endpointUrl: 'http://169.254.169.254/' would receive the credentials of Secret " in str(
        refused.value
    )
    assert "spec.limits.allowedEndpoints" in str(refused.value)
    document = yaml.safe_load(GPU_CLASS.read_text())
    document["spec"]["limits"]["allowedEndpoints"] = ["http://minio.team-vision.svc:9000"]
    allowing = parse_class(document)
    ok = effective_spec({**spec, "storage": {"endpointUrl": "http://minio.team-vision.svc:9000"}}, allowing)
    assert ok.storage.secretRef is not None and ok.storage.endpointUrl == "http://minio.team-vision.svc:9000"
    assert effective_spec(spec, gpu).storage.endpointUrl is None  # the class's own (AWS S3): fine
