"""BatchInferenceClass on the real control plane, through the real operator (the chart's RBAC): defaults applied,
limits and enforced fields refused with nothing created, the default class, two defaults, a class edit leaving
a running job alone, `render --class` equal to what the operator creates, and tenant RBAC through the built-in
`edit`/`view` roles (aggregated by the real kube-controller-manager)."""

from __future__ import annotations

import copy
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException
from typer.testing import CliRunner

from batchinfer_job import classes as c
from batchinfer_job import spec as s
from batchinfer_operator.cli import app
from tests.controlplane.cluster import ControlPlane
from tests.controlplane.fixtures import Cluster, OperatorProcess, create_all, impersonating
from tests.helpers import eventually

pytestmark = pytest.mark.usefixtures("real_operator")

SAMPLES = Path("manifests/samples")
TENANT_RBAC = Path("manifests/rbac/tenant-rbac.yaml")
KUBECTL = Path("build/tools/kubectl")


def kubectl_get(plane: ControlPlane, *args: str) -> list[list[str]]:
    """`kubectl get …` as the admin: its table, a list of words per line (empty cells vanish)."""
    command = [str(KUBECTL), "--kubeconfig", str(plane.kubeconfig), "get", *args]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines() if line]


def class_document(name: str, default: bool = False, **limits: Any) -> dict[str, Any]:
    """The GPU sample class under another name (and its limits changed)."""
    document = yaml.safe_load((SAMPLES / "classes" / "gpu-a100.yaml").read_text())
    document["metadata"] = {"name": name}
    if default:
        document["metadata"]["annotations"] = {c.DEFAULT_ANNOTATION: "true"}
    document["spec"]["limits"].update(limits)
    return document


def bi_document(name: str, class_name: str | None, **extra: Any) -> dict[str, Any]:
    document = yaml.safe_load((SAMPLES / "minimal-with-class.yaml").read_text())
    document["metadata"] = {"name": name}
    document["spec"].pop("className")
    if class_name:
        document["spec"]["className"] = class_name
    document["spec"].update(extra)
    return document


class Classes:
    """Creates BatchInferenceClasses and deletes them after the test (they are cluster-wide)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.names = cluster, []

    def create(self, document: dict[str, Any]) -> dict[str, Any]:
        self.names.append(document["metadata"]["name"])
        return self.cluster.custom.create_cluster_custom_object(s.API_GROUP, s.API_VERSION, c.PLURAL, document)

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        self.cluster.custom.patch_cluster_custom_object(s.API_GROUP, s.API_VERSION, c.PLURAL, name, patch)

    def delete_all(self) -> None:
        for name in self.names:
            try:
                self.cluster.custom.delete_cluster_custom_object(s.API_GROUP, s.API_VERSION, c.PLURAL, name)
            except ApiException as err:
                if err.status != 404:
                    raise


@pytest.fixture
def classes(cluster: Cluster) -> Iterator[Classes]:
    made = Classes(cluster)
    yield made
    made.delete_all()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def rayjobs(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return cluster.ray(namespace, "rayjobs")


def start_under_new_class(cluster: Cluster, namespace: str, classes: Classes, bi: str) -> tuple[str, dict[str, Any]]:
    """A new class (the GPU sample's) and a BatchInference naming it: (the class name, its RayJob)."""
    name = unique(bi)
    classes.create(class_document(name))
    cluster.create_bi(namespace, bi_document(bi, name))
    (rayjob,) = eventually(lambda: rayjobs(cluster, namespace), 60, "the RayJob")
    return name, rayjob


def condition(bi: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [x for x in (bi.get("status") or {}).get("conditions") or [] if x.get("type") == kind]
    return found[0] if found else {}


def bi_when(cluster: Cluster, namespace: str, name: str, predicate: Callable[[dict[str, Any]], Any]) -> dict | None:
    """The BatchInference when `predicate` holds for it, else None (for eventually)."""
    bi = cluster.get_bi(namespace, name)
    return bi if predicate(bi) else None


def events(cluster: Cluster, namespace: str, name: str) -> list[Any]:
    listed = cluster.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [e for e in listed if e.reason == "SpecRejected"]


def test_the_class_crd_is_cluster_scoped_with_its_columns(
    cluster: Cluster, classes: Classes, control_plane: ControlPlane
) -> None:
    crd = cluster.extensions.read_custom_resource_definition(f"{c.PLURAL}.{s.API_GROUP}")
    assert crd.spec.scope == "Cluster" and crd.spec.names.short_names == ["bic"]
    name, default = unique("cols"), unique("cols-default")
    classes.create(class_document(name, maxGpusPerJob=6))
    classes.create(class_document(default, default=True, maxGpusPerJob=0))
    header, *lines = kubectl_get(control_plane, "bic", name, default)
    assert header[:3] == ["NAME", "DEFAULT", "MAX-GPUS"]
    rows = {line[0]: line[1:-1] for line in lines}
    assert rows == {name: ["6"], default: ["true", "0"]}  # no annotation: an empty DEFAULT column


def test_class_defaults_reach_the_rayjob_and_status_names_the_class(
    cluster: Cluster, cluster_namespace: str, classes: Classes, control_plane: ControlPlane
) -> None:
    name, rayjob = start_under_new_class(cluster, cluster_namespace, classes, "tagging")
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert worker["template"]["spec"]["priorityClassName"] == "batch-low"
    assert worker["template"]["spec"]["containers"][0]["image"] == "registry.example.com/ml/batchinfer-job:0.1.0"
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-batch"
    assert rayjob["spec"]["activeDeadlineSeconds"] == 86400
    status = eventually(
        lambda: bi_when(cluster, cluster_namespace, "tagging", lambda b: (b.get("status") or {}).get("className")),
        30,
        "status.className",
    )["status"]
    assert status["className"] == name and status["effectiveSpec"]["scheduling"]["queueName"] == "ml-batch"
    header, row = kubectl_get(control_plane, "bi", "-n", cluster_namespace)
    assert header[:2] == ["NAME", "CLASS"] and row[:2] == ["tagging", name]


GPU_OVERRIDABLE = yaml.safe_load((SAMPLES / "classes" / "gpu-a100.yaml").read_text())["spec"]["limits"]["overridable"]
NINE_WORKERS = {"cluster": {"workers": {"replicas": 9, "minReplicas": 9, "maxReplicas": 9}}}


@pytest.mark.parametrize(
    ("extra", "limits", "reason", "field"),
    [
        (NINE_WORKERS, {"maxWorkerReplicas": 100}, "ClassLimitExceeded", "spec.cluster"),  # 9 GPUs, 8 allowed
        (NINE_WORKERS, {"maxGpusPerJob": 100}, "ClassLimitExceeded", "spec.cluster.workers.maxReplicas"),
        ({"activeDeadlineSeconds": 999999}, {}, "ClassLimitExceeded", "spec.activeDeadlineSeconds"),
        ({"input": {"uri": "s3://team-payroll/scans/"}}, {}, "ClassLimitExceeded", "spec.input.uri"),
        ({"output": {"uri": "s3://someone-else/out/"}}, {}, "ClassLimitExceeded", "spec.output.uri"),
        (
            {"model": {"weightsUri": "s3://elsewhere/m.pt", "architecture": "resnet50"}},
            {},
            "ClassLimitExceeded",
            "spec.model.weightsUri",
        ),
        (
            {"cluster": {"image": "docker.io/someone/miner:1"}},
            {"overridable": [*GPU_OVERRIDABLE, "cluster.image"]},
            "ClassLimitExceeded",
            "spec.cluster.image",
        ),
        ({"scheduling": {"nodeSelector": {"pool": "cheap"}}}, {}, "EnforcedField", "spec.scheduling.nodeSelector"),
        ({"cluster": {"image": "registry.example.com/ml/x:1"}}, {}, "EnforcedField", "spec.cluster.image"),
    ],
)
def test_a_limit_or_an_enforced_field_is_refused_and_nothing_is_created(
    cluster: Cluster,
    cluster_namespace: str,
    classes: Classes,
    extra: dict[str, Any],
    limits: dict[str, Any],
    reason: str,
    field: str,
) -> None:
    name = unique("gpu")
    classes.create(class_document(name, **limits))
    cluster.create_bi(cluster_namespace, bi_document("greedy", name, **extra))

    def refused() -> dict[str, Any]:
        bi = cluster.get_bi(cluster_namespace, "greedy")
        return bi if (bi.get("status") or {}).get("phase") == "Failed" else {}

    bi = eventually(refused, 60, "the BatchInference refused")
    rejected = condition(bi, "SpecRejected")
    assert rejected["status"] == "True" and rejected["reason"] == reason
    assert rejected["message"].startswith(f"{field}:") and repr(name) in rejected["message"]
    assert bi["status"]["reason"] == "SpecRejected"
    assert eventually(lambda: events(cluster, cluster_namespace, "greedy"), 30, "a SpecRejected Event")
    assert rayjobs(cluster, cluster_namespace) == []
    ours = cluster.core.list_namespaced_config_map(cluster_namespace, label_selector="batchinfer.dev/name=greedy")
    assert ours.items == []
    assert cluster.core.list_namespaced_service_account(cluster_namespace).items[0].metadata.name == "default"


def test_a_missing_class_waits_and_the_job_starts_once_it_exists(
    cluster: Cluster, cluster_namespace: str, classes: Classes
) -> None:
    name = unique("later")
    cluster.create_bi(cluster_namespace, bi_document("early", name))
    bi = eventually(
        lambda: bi_when(cluster, cluster_namespace, "early", lambda b: condition(b, "SpecRejected")),
        60,
        "SpecRejected for the missing class",
    )
    assert (
        condition(bi, "SpecRejected")["reason"] == "ClassNotFound"
        and repr(name) in condition(bi, "SpecRejected")["message"]
    )
    assert bi["status"]["phase"] == "Pending" and rayjobs(cluster, cluster_namespace) == []
    classes.create(class_document(name))  # e.g. Argo CD synced the class after the job
    eventually(lambda: rayjobs(cluster, cluster_namespace), 90, "the RayJob once the class exists")
    accepted = eventually(
        lambda: condition(cluster.get_bi(cluster_namespace, "early"), "SpecRejected").get("status") == "False",
        30,
        "SpecRejected cleared",
    )
    assert accepted


def test_the_default_class_applies_and_two_defaults_are_reported(
    cluster: Cluster, cluster_namespace: str, classes: Classes
) -> None:
    first, second = unique("dflt-a"), unique("dflt-b")
    classes.create(class_document(first, default=True))
    cluster.create_bi(cluster_namespace, bi_document("plain", None))
    (rayjob,) = eventually(lambda: rayjobs(cluster, cluster_namespace), 60, "the RayJob under the default class")
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-batch"
    eventually(
        lambda: (cluster.get_bi(cluster_namespace, "plain").get("status") or {}).get("className") == first,
        30,
        "status.className of the default class",
    )

    classes.create(class_document(second, default=True))
    cluster.create_bi(cluster_namespace, bi_document("ambiguous", None))
    bi = eventually(
        lambda: bi_when(cluster, cluster_namespace, "ambiguous", lambda b: condition(b, "SpecRejected")),
        60,
        "SpecRejected for two defaults",
    )
    assert condition(bi, "SpecRejected")["reason"] == "AmbiguousDefaultClass"
    assert f"{first}, {second}" in condition(bi, "SpecRejected")["message"]
    assert len(rayjobs(cluster, cluster_namespace)) == 1

    def class_warnings() -> set[str]:
        listed = cluster.core.list_event_for_all_namespaces(field_selector="reason=AmbiguousDefaultClass").items
        return {e.involved_object.name for e in listed}

    assert eventually(lambda: {first, second} & class_warnings(), 30, "an AmbiguousDefaultClass Event on a class")


def test_a_class_edit_does_not_change_a_running_job(
    cluster: Cluster, cluster_namespace: str, classes: Classes, real_operator: OperatorProcess
) -> None:
    name, before = start_under_new_class(cluster, cluster_namespace, classes, "steady")
    effective = eventually(
        lambda: (cluster.get_bi(cluster_namespace, "steady").get("status") or {}).get("effectiveSpec"), 30, "status"
    )
    classes.patch(name, {"spec": {"defaults": {"scheduling": {"queueName": "other", "nodeSelector": {"x": "y"}}}}})
    real_operator.restart()  # the operator resumes every BatchInference: it must not re-read the class
    cluster.patch_bi(cluster_namespace, "steady", {"spec": {"suspend": True}})  # and an update must not either
    eventually(
        lambda: (
            condition(cluster.get_bi(cluster_namespace, "steady"), "SpecRejected").get("status") != "True"
            and (cluster.get_bi(cluster_namespace, "steady").get("status") or {}).get("observedGeneration") == 2
        ),
        60,
        "the suspend change handled",
    )
    (after,) = rayjobs(cluster, cluster_namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-batch"
    for group in ("headGroupSpec", "workerGroupSpecs"):
        assert mismatch(after["spec"]["rayClusterSpec"][group], before["spec"]["rayClusterSpec"][group]) is None
    assert cluster.get_bi(cluster_namespace, "steady")["status"]["effectiveSpec"] == effective


def test_render_with_class_equals_what_the_operator_creates(
    cluster: Cluster, cluster_namespace: str, classes: Classes, tmp_path: Path
) -> None:
    name = unique("same")
    class_doc = class_document(name)
    classes.create(class_doc)
    document = bi_document("twin", name, compute={"maxActors": 3})
    cluster.create_bi(cluster_namespace, copy.deepcopy(document))
    (class_file := tmp_path / "class.yaml").write_text(yaml.safe_dump(class_doc))
    (bi_file := tmp_path / "bi.yaml").write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(
        app, ["render", str(bi_file), "--class", str(class_file), "--namespace", cluster_namespace]
    )
    assert result.exit_code == 0, result.output
    rendered = {d["kind"]: d for d in yaml.safe_load_all(result.stdout)}
    (rayjob,) = eventually(lambda: rayjobs(cluster, cluster_namespace), 60, "the RayJob")
    assert mismatch(rayjob["spec"], rendered["RayJob"]["spec"]) is None  # the server adds KubeRay's CRD defaults only
    assert rayjob["metadata"]["labels"] == rendered["RayJob"]["metadata"]["labels"]
    configmap = cluster.core.read_namespaced_config_map("twin-job", cluster_namespace)
    assert configmap.data == rendered["ConfigMap"]["data"]


def mismatch(stored: Any, rendered: Any, path: str = "") -> str | None:
    """Where `stored` lacks or differs from what `rendered` has, or None. Server-set defaults besides are fine,
    and so are missing empty values: KubeRay writes its objects back from Go structs (`omitempty` drops them)."""
    if isinstance(rendered, dict) and isinstance(stored, dict):
        for key, value in rendered.items():
            if key not in stored:
                found = None if value in (False, 0, "", None, {}, []) else f"{path}.{key} missing"
            else:
                found = mismatch(stored[key], value, f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(rendered, list) and isinstance(stored, list) and len(stored) == len(rendered):
        return next(
            filter(
                None, (mismatch(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(stored, rendered, strict=True)))
            ),
            None,
        )
    if isinstance(rendered, int) and isinstance(stored, str):  # a quantity (nvidia.com/gpu: 1), as KubeRay writes it
        rendered = str(rendered)
    return None if stored == rendered else f"{path}: stored {stored!r}, rendered {rendered!r}"


def test_a_class_less_document_breaking_a_rule_across_fields_is_failed_by_the_operator(
    cluster: Cluster, cluster_namespace: str
) -> None:
    document = bi_document("wide", None, cluster={"workers": {"replicas": 2, "minReplicas": 2, "maxReplicas": 8}})
    document["spec"]["output"] = {"uri": "s3://b/out/"}
    cluster.create_bi(cluster_namespace, document)  # admitted: a class could have enabled autoscaling
    bi = eventually(
        lambda: bi_when(cluster, cluster_namespace, "wide", lambda b: (b.get("status") or {}).get("phase")),
        60,
        "a phase",
    )
    assert bi["status"]["phase"] == "Failed" and "enableInTreeAutoscaling" in bi["status"]["message"]
    assert rayjobs(cluster, cluster_namespace) == []


@pytest.fixture(scope="module")
def tenant_roles(cluster: Cluster) -> None:
    """The chart's aggregated roles (manifests/rbac/tenant-rbac.yaml is rendered from it: make manifests)."""
    create_all(cluster, TENANT_RBAC)


def bind(cluster: Cluster, namespace: str, user: str, role: str) -> None:
    cluster.rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": f"{user}-{role}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        },
    )


def test_a_namespace_editor_runs_batchinferences_but_cannot_touch_classes(
    cluster: Cluster, cluster_namespace: str, classes: Classes, control_plane: ControlPlane, tenant_roles: None
) -> None:
    name = unique("tenant")
    classes.create(class_document(name))
    bind(cluster, cluster_namespace, "alice", "edit")
    bind(cluster, cluster_namespace, "bob", "view")
    alice, bob = impersonating(control_plane, "alice"), impersonating(control_plane, "bob")

    def created_by_alice() -> bool:  # the aggregation controller fills `edit` within a moment
        try:
            alice.create_bi(cluster_namespace, bi_document("alices", name), dry_run=True)
        except ApiException as err:
            assert err.status == 403, err.body
            return False
        return True

    eventually(created_by_alice, 60, "edit aggregating batchinfer-edit")
    alice.create_bi(cluster_namespace, bi_document("alices", name))
    alice.patch_bi(cluster_namespace, "alices", {"spec": {"suspend": True}})
    assert [
        i["metadata"]["name"]
        for i in alice.custom.list_cluster_custom_object(s.API_GROUP, s.API_VERSION, c.PLURAL)["items"]
    ]
    assert bob.get_bi(cluster_namespace, "alices")["metadata"]["name"] == "alices"

    refusals = {
        "alice creates a class": lambda: alice.custom.create_cluster_custom_object(
            s.API_GROUP, s.API_VERSION, c.PLURAL, class_document(unique("mine"), default=True)
        ),
        "alice edits a class": lambda: alice.custom.patch_cluster_custom_object(
            s.API_GROUP, s.API_VERSION, c.PLURAL, name, {"spec": {"limits": {"maxGpusPerJob": 64}}}
        ),
        "alice deletes a class": lambda: alice.custom.delete_cluster_custom_object(
            s.API_GROUP, s.API_VERSION, c.PLURAL, name
        ),
        "bob creates a BatchInference": lambda: bob.create_bi(cluster_namespace, bi_document("bobs", name)),
        "alice writes status": lambda: alice.custom.patch_namespaced_custom_object_status(
            s.API_GROUP, s.API_VERSION, cluster_namespace, s.PLURAL, "alices", {"status": {"phase": "Succeeded"}}
        ),
    }
    for what, attempt in refusals.items():
        with pytest.raises(ApiException) as refused:
            attempt()
        assert refused.value.status == 403, what


def test_the_chart_installs_classes_from_values_on_a_real_api_server(control_plane: ControlPlane) -> None:
    """`helm install … -f values` with classes, as a server-side dry run: the API server validates each
    BatchInferenceClass against the CRD as served (and helm's own checks run).

    A dry run installs no crds/, so peering (whose CRD lives there) is off; the README's plain install runs
    for real in test_controlplane_make. Another release name: the operator tests hold the chart's RBAC under
    the name "batchinfer".
    """
    helm = Path("build/tools/helm").resolve()
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    values = "charts/batchinfer/ci/classes-values.yaml"
    command = [str(helm), "install", "platform", "charts/batchinfer", "--namespace", "batchinfer-classes"]
    command += ["--create-namespace", "-f", values, "--set", "peering.enabled=false", "--dry-run=server"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kind: BatchInferenceClass" in result.stdout and "batchinfer.dev/is-default-class" in result.stdout
