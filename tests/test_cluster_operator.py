"""The real kopf operator (the chart's ServiceAccount and ClusterRole) and the real KubeRay operator on a real
control plane: children, the pods KubeRay makes of our RayJob, RBAC as an authorizer enforces it, garbage
collection, restarts, and status mirrored from what KubeRay reports."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes.client.rest import ApiException

from batchinfer_job import spec as s
from batchinfer_job.documents import parse_document
from batchinfer_job.progress import ProgressReport
from batchinfer_job.status_reporter import StatusReporter
from batchinfer_operator import naming
from batchinfer_operator.render import Owner, service_account_name
from batchinfer_operator.settings import DEFAULT_JOB_IMAGE
from tests.controlplane.fixtures import OPERATOR_NAMESPACE, RESYNC_SECONDS, Cluster, OperatorProcess, impersonating
from tests.helpers import eventually

pytestmark = pytest.mark.usefixtures("real_operator")

TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SECRET_VALUE = f"never-copy-{uuid.uuid4().hex}"  # a credential that must appear in no spec, status or log


def gpu_document(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{s.API_GROUP}/{s.API_VERSION}",
        "kind": s.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"torchvision": {"name": "resnet152", "weights": "IMAGENET1K_V2"}},
            "input": {"uri": "s3://datasets/val/"},
            "output": {"uri": "s3://predictions/val/"},
            "compute": {"device": "cuda", "gpusPerActor": 1},
            "storage": {"secretRef": {"name": "s3-credentials"}},
            "cluster": {"workers": {"replicas": 1, "minReplicas": 1, "maxReplicas": 1, "resources": {"gpu": 1}}},
            "scheduling": {
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    }


def create_secret(cluster: Cluster, namespace: str) -> None:
    data = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE}
    cluster.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        },
    )


@pytest.fixture
def running(cluster: Cluster, cluster_namespace: str) -> tuple[str, dict[str, Any]]:
    """A GPU BatchInference whose RayCluster and pods KubeRay has created (pods stay Pending: no nodes)."""
    create_secret(cluster, cluster_namespace)
    document = gpu_document("resnet")
    cluster.create_bi(cluster_namespace, document)
    eventually(lambda: len(cluster.pods(cluster_namespace)) >= 2, 90, "KubeRay's head and worker pods")
    return cluster_namespace, document


def owner_uids(obj: Any) -> set[str]:
    refs = obj["metadata"].get("ownerReferences") if isinstance(obj, dict) else obj.metadata.owner_references
    return {r["uid"] if isinstance(r, dict) else r.uid for r in refs or []}


def test_the_operator_creates_children_owned_by_the_batchinference(cluster: Cluster, running) -> None:
    namespace, _ = running
    bi = cluster.get_bi(namespace, "resnet")
    uid = bi["metadata"]["uid"]
    (rayjob,) = cluster.ray(namespace, "rayjobs")
    (ref,) = rayjob["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("BatchInference", "resnet", uid, True)
    configmap = cluster.core.read_namespaced_config_map(naming.child_name("resnet", "job"), namespace)
    assert json.loads(configmap.data["spec.json"])["spec"]["model"] == bi["spec"]["model"]
    status = eventually(lambda: cluster.get_bi(namespace, "resnet").get("status", {}).get("observedGeneration"))
    assert status == 1
    events = eventually(
        lambda: [e for e in cluster.core.list_namespaced_event(namespace).items if e.reason == "Created"]
    )
    assert "RayJob/resnet" in events[0].message
    job = naming.rayjob_name("resnet")
    assert owner_uids(cluster.core.read_namespaced_config_map(naming.child_name("resnet", "job"), namespace)) == {uid}
    assert owner_uids(
        cluster.core.read_namespaced_service_account(naming.runner_account_name("resnet"), namespace)
    ) == {uid}
    (role,) = [r for r in cluster.rbac.list_namespaced_role(namespace).items if r.metadata.name.startswith(job)]
    (binding,) = [
        b for b in cluster.rbac.list_namespaced_role_binding(namespace).items if b.metadata.name.startswith(job)
    ]
    assert owner_uids(role) == owner_uids(binding) == {uid}


def test_kuberay_turns_our_rayjob_into_the_pods_we_asked_for(cluster: Cluster, running) -> None:
    namespace, document = running
    (raycluster,) = cluster.ray(namespace, "rayclusters")
    (rayjob,) = cluster.ray(namespace, "rayjobs")
    assert owner_uids(raycluster) == {rayjob["metadata"]["uid"]}
    spec = parse_document({**document, "metadata": {"name": "resnet", "namespace": namespace}}).spec
    runner = service_account_name(spec, Owner("resnet", namespace))
    pods = {p.metadata.labels.get("ray.io/node-type"): p for p in cluster.pods(namespace)}
    assert {"head", "worker"} <= set(pods)
    for kind, pod in pods.items():
        if kind not in ("head", "worker"):
            continue
        container = pod.spec.containers[0]
        assert container.image == DEFAULT_JOB_IMAGE
        assert pod.spec.service_account_name == runner
        assert [e.secret_ref.name for e in container.env_from] == ["s3-credentials"]
        assert container.security_context.allow_privilege_escalation is False
    worker_pod, head_pod = pods["worker"].spec, pods["head"].spec
    assert worker_pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert any(t.key == "nvidia.com/gpu" and t.operator == "Exists" for t in worker_pod.tolerations)
    # the CPU-only head is not pinned to GPU nodes (the only tolerations it has are the API server's defaults)
    assert not head_pod.node_selector and not any(t.key == "nvidia.com/gpu" for t in head_pod.tolerations or [])
    # the API server's ServiceAccount admission mounts a token into the head only
    assert any(m.mount_path == TOKEN_DIR for m in head_pod.containers[0].volume_mounts)
    assert not any(m.mount_path == TOKEN_DIR for c in worker_pod.containers for m in c.volume_mounts or [])
    worker = pods["worker"].spec.containers[0]
    assert worker.resources.limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in (pods["head"].spec.containers[0].resources.limits or {})


def test_no_secret_value_reaches_specs_status_or_logs(
    cluster: Cluster, running, real_operator: OperatorProcess, control_plane
) -> None:
    namespace, _ = running
    everything = [
        cluster.get_bi(namespace, "resnet"),
        *cluster.ray(namespace, "rayjobs"),
        *cluster.ray(namespace, "rayclusters"),
        *[cluster.api.sanitize_for_serialization(p) for p in cluster.pods(namespace)],
        *[cluster.api.sanitize_for_serialization(c) for c in cluster.core.list_namespaced_config_map(namespace).items],
    ]
    text = json.dumps(everything)
    assert "s3-credentials" in text  # referenced by name…
    assert SECRET_VALUE not in text  # …never copied
    assert SECRET_VALUE not in real_operator.text()
    assert SECRET_VALUE not in (control_plane.folder / "ray-operator.log").read_text(errors="replace")


def test_status_mirrors_what_the_real_kuberay_reports(cluster: Cluster, running) -> None:
    namespace, _ = running

    def mirrored() -> dict[str, Any]:
        status = cluster.get_bi(namespace, "resnet").get("status", {})
        (raycluster,) = cluster.ray(namespace, "rayclusters")
        assert status.get("rayClusterName") == raycluster["metadata"]["name"], status
        return status

    status = eventually(mirrored, 60, "the RayCluster name KubeRay chose, in the BatchInference status")
    (rayjob,) = cluster.ray(namespace, "rayjobs")
    assert rayjob["status"]["jobDeploymentStatus"] == "Initializing"  # no node can run the pods here
    assert status["phase"] == "Pending"
    assert status["rayJobName"] == rayjob["metadata"]["name"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Running"] == "False"


def runner_identity(namespace: str) -> tuple[str, list[str]]:
    sa = naming.runner_account_name("resnet")
    return f"system:serviceaccount:{namespace}:{sa}", ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]


def test_the_job_may_patch_only_its_own_status(cluster: Cluster, running, control_plane) -> None:
    namespace, _ = running
    other = gpu_document("other")
    other["spec"]["suspend"] = True
    cluster.create_bi(namespace, other)
    user, groups = runner_identity(namespace)
    job = impersonating(control_plane, user, groups)
    progress = {"status": {"progress": {"processed": 7, "total": 10}}}

    patched = job.custom.patch_namespaced_custom_object_status(
        s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, "resnet", progress
    )
    assert patched["status"]["progress"]["processed"] == 7
    refusals = {
        "another BatchInference's status": lambda: job.custom.patch_namespaced_custom_object_status(
            s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, "other", progress
        ),
        "its own spec": lambda: job.patch_bi(namespace, "resnet", {"spec": {"suspend": True}}),
        "Secrets": lambda: job.core.list_namespaced_secret(namespace),
        "a Secret by name": lambda: job.core.read_namespaced_secret("s3-credentials", namespace),
        "pods": lambda: job.core.create_namespaced_pod(
            namespace, {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "busybox"}]}}
        ),
    }
    for what, call in refusals.items():
        with pytest.raises(ApiException) as refused:
            call()
        assert refused.value.status == 403, f"{what}: {refused.value.status} {refused.value.body}"


def test_kubectl_get_shows_n_of_unknown_until_the_total_is_known(running, control_plane) -> None:
    """The job's own reporter, as the runner ServiceAccount; kubectl's PROGRESS column as users see it."""
    namespace, _ = running
    user, groups = runner_identity(namespace)
    reporter = StatusReporter(namespace, "resnet", impersonating(control_plane, user, groups).custom, interval=0)
    kubectl = [str(Path("build/tools/kubectl").resolve()), "--kubeconfig", str(control_plane.kubeconfig)]

    def progress_column() -> str:
        shown = subprocess.run([*kubectl, "-n", namespace, "get", "bi", "resnet"], capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        header, row = shown.stdout.splitlines()
        start = header.index("PROGRESS")
        return row[start:].split("  ")[0].strip()

    reporter(ProgressReport(processed=1200, failed=0, total=None, seconds=10.0))
    assert eventually(lambda: progress_column() == "1200/?" or None, what="1200/?")
    reporter(ProgressReport(processed=2400, failed=0, total=50000, seconds=20.0))
    assert eventually(lambda: progress_column() == "2400/50000 (5%)" or None, what="2400/50000 (5%)")


def test_deleting_a_batchinference_collects_its_children(cluster: Cluster, running) -> None:
    namespace, _ = running
    cluster.delete_bi(namespace, "resnet")

    def gone() -> bool:
        left = {
            "rayjobs": cluster.ray(namespace, "rayjobs"),
            "rayclusters": cluster.ray(namespace, "rayclusters"),
            "configmaps": [
                c for c in cluster.core.list_namespaced_config_map(namespace).items if c.metadata.owner_references
            ],
            "serviceaccounts": [
                a for a in cluster.core.list_namespaced_service_account(namespace).items if a.metadata.owner_references
            ],
            "roles": cluster.rbac.list_namespaced_role(namespace).items,
            "rolebindings": cluster.rbac.list_namespaced_role_binding(namespace).items,
        }
        assert not any(left.values()), {k: len(v) for k, v in left.items()}
        return True

    eventually(gone, 90, "the garbage collector to remove every child")


def test_restarting_the_operator_creates_no_second_rayjob(
    cluster: Cluster, running, real_operator: OperatorProcess
) -> None:
    namespace, _ = running
    (before,) = cluster.ray(namespace, "rayjobs")
    resumed = f"[{namespace}/resnet] Handler 'create_children' succeeded"
    seen = real_operator.text().count(resumed)
    real_operator.restart()
    eventually(lambda: real_operator.text().count(resumed) > seen, 60, "the restarted operator to resume resnet")
    (after,) = cluster.ray(namespace, "rayjobs")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]


def test_the_operator_needs_nothing_beyond_the_charts_clusterrole(real_operator: OperatorProcess) -> None:
    """Runs last in this module: every handler above ran with the chart's RBAC, and none was refused."""
    log = real_operator.text()
    assert "Handler 'create_children' succeeded" in log and "Handler 'mirror_rayjob' succeeded" in log
    # What the RBAC authorizer says when it refuses (other 403s, e.g. a namespace being deleted, are not RBAC).
    denied = 'is forbidden: User "system:serviceaccount:batchinfer-system:batchinfer" cannot'
    assert denied not in log, [line for line in log.splitlines() if denied in line][:5]


def test_a_long_name_with_autoscaling_gets_a_service_account_that_exists(
    cluster: Cluster, cluster_namespace: str
) -> None:
    """KubeRay's CheckName cuts a head pod's serviceAccountName to 50 characters when autoscaling; ours is never
    longer, so the autoscaler's RoleBinding and the head pod name the ServiceAccount the operator created."""
    name = "a-very-long-batchinference-name-for-the-nightly-catalog-run-x1"  # 62 characters
    document = gpu_document(name)
    document["spec"]["storage"] = {}
    document["spec"]["cluster"] = {"enableInTreeAutoscaling": True, "workers": {"replicas": 1, "maxReplicas": 2}}
    cluster.create_bi(cluster_namespace, document)
    head = eventually(
        lambda: [p for p in cluster.pods(cluster_namespace) if p.metadata.labels.get("ray.io/node-type") == "head"],
        90,
        "the head pod",
    )[0]
    account = head.spec.service_account_name
    assert account == naming.runner_account_name(name) and len(account) <= 50
    cluster.core.read_namespaced_service_account(account, cluster_namespace)  # exists: no 404
    bindings = eventually(
        lambda: (lambda items: items if len(items) >= 2 else None)(
            cluster.rbac.list_namespaced_role_binding(cluster_namespace).items
        ),
        60,
        "our progress RoleBinding and KubeRay's autoscaler RoleBinding",
    )
    subjects = {s.name for b in bindings for s in b.subjects or []}
    assert subjects == {account}, subjects  # ours (progress) and KubeRay's autoscaler binding name the same account


def mark_ready(cluster: Cluster, pod) -> None:
    """What a kubelet would report for a started pod (there is no kubelet here)."""
    now = "2026-11-27T00:00:00Z"
    statuses = [
        {
            "name": c.name,
            "ready": True,
            "restartCount": 0,
            "image": c.image,
            "imageID": "",
            "started": True,
            "state": {"running": {"startedAt": now}},
        }
        for c in pod.spec.containers
    ]
    cluster.core.patch_namespaced_pod_status(
        pod.metadata.name,
        pod.metadata.namespace,
        {
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": statuses,
            }
        },
    )


def test_a_restricted_namespace_admits_every_pod_kuberay_creates(cluster: Cluster, cluster_namespace: str) -> None:
    """Pod Security `restricted`: the head (with the autoscaler sidecar), the workers and the job submitter."""
    cluster.core.patch_namespace(
        cluster_namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    document = gpu_document("locked")
    document["spec"]["storage"] = {}
    document["spec"]["cluster"] = {"enableInTreeAutoscaling": True, "workers": {"replicas": 1, "maxReplicas": 2}}
    cluster.create_bi(cluster_namespace, document)

    def ray_pods() -> list:
        pods = [
            p
            for p in cluster.pods(cluster_namespace)
            if p.metadata.labels.get("ray.io/node-type") in ("head", "worker")
        ]
        return pods if len(pods) == 2 else []

    pods = eventually(ray_pods, 90, "the head and worker pods admitted")
    head = next(p for p in pods if p.metadata.labels["ray.io/node-type"] == "head")
    assert {c.name for c in head.spec.containers} >= {"ray-head", "autoscaler"}
    for pod in pods:
        mark_ready(cluster, pod)
    submitter = eventually(
        lambda: [p for p in cluster.pods(cluster_namespace) if p.metadata.labels.get("job-name")],
        90,
        "the submitter pod, admitted",
    )[0]
    assert submitter.spec.service_account_name == naming.runner_account_name("locked")
    assert not submitter.spec.node_selector  # a CPU pod: none of the GPU workers' scheduling
    refused = [
        e.message
        for e in cluster.core.list_namespaced_event(cluster_namespace).items
        if "PodSecurity" in (e.message or "")
    ]
    assert refused == []


# KubeRay's manager waits 2 minutes for every informer's cache (controller-runtime's CacheSyncTimeout) and v1.6.1
# always starts its RayService controller: without that CRD it exits then. A little past it, to be sure.
KUBERAY_CACHE_SYNC_SECONDS = 120 + 15


def test_kuberay_outlives_its_cache_sync_timeout(control_plane) -> None:
    process = psutil.Process(control_plane.pids["ray-operator"])
    age = time.time() - process.create_time()
    if age < KUBERAY_CACHE_SYNC_SECONDS:
        time.sleep(KUBERAY_CACHE_SYNC_SECONDS - age)
    log = (control_plane.folder / "ray-operator.log").read_text(errors="replace")
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE, log[-3000:]
    assert "failed to wait for rayservice caches to sync" not in log
    assert re.search(r"controllers\.RayService\s+Starting workers", log), log[-3000:]  # its cache synced


def test_the_charts_rbac_lets_the_operator_delete_a_rayjob(cluster: Cluster, running, control_plane) -> None:
    """Past activeDeadlineSeconds the operator deletes the RayJob (and, by garbage collection, its RayCluster and
    pods). Before `delete` was in the chart's ClusterRole the API server refused it with 403 and the job ran on."""
    namespace, _ = running
    (rayjob,) = cluster.ray(namespace, "rayjobs")
    operator = impersonating(
        control_plane,
        f"system:serviceaccount:{OPERATOR_NAMESPACE}:batchinfer",
        ["system:serviceaccounts", f"system:serviceaccounts:{OPERATOR_NAMESPACE}"],
    )
    name = rayjob["metadata"]["name"]
    operator.custom.delete_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name)
    eventually(lambda: cluster.ray(namespace, "rayjobs") == [], 30, "the RayJob gone")
    eventually(lambda: cluster.ray(namespace, "rayclusters") == [], 60, "its RayCluster collected")


def test_owner_references_are_enforced_and_the_charts_rbac_satisfies_them(
    cluster: Cluster, running, control_plane
) -> None:
    """The API server runs OwnerReferencesPermissionEnforcement, as OpenShift does: a child whose owner reference
    sets blockOwnerDeletion (kopf's do) needs `update` on batchinferences/finalizers. Someone allowed to create
    ConfigMaps but not that is refused; the operator, with the chart's ClusterRole, is not."""
    namespace, _ = running
    bi = cluster.get_bi(namespace, "resnet")
    owner = {
        "apiVersion": f"{s.API_GROUP}/{s.API_VERSION}",
        "kind": s.KIND,
        "name": "resnet",
        "uid": bi["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    cluster.rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "configmap-writer"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}],
        },
    )
    subjects = [
        {"kind": "User", "name": "stranger", "apiGroup": "rbac.authorization.k8s.io"},
        {"kind": "ServiceAccount", "name": "batchinfer", "namespace": OPERATOR_NAMESPACE},
    ]
    cluster.rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "configmap-writer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-writer"},
            "subjects": subjects,
        },
    )

    def child(name: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "ownerReferences": [owner]}, "data": {}}

    with pytest.raises(ApiException) as refused:
        impersonating(control_plane, "stranger").core.create_namespaced_config_map(namespace, child("by-stranger"))
    assert refused.value.status in (403, 422) and "blockOwnerDeletion" in refused.value.body, refused.value.body
    operator = impersonating(control_plane, f"system:serviceaccount:{OPERATOR_NAMESPACE}:batchinfer")
    operator.core.create_namespaced_config_map(namespace, child("by-operator"))


def test_a_job_held_suspended_past_its_deadline_runs_once_resumed(cluster: Cluster, cluster_namespace: str) -> None:
    """KubeRay sets a RayJob's status.startTime when it initializes, also when it is created suspended (as Kueue
    holds it), and keeps it while Suspended. The deadline counts from when the job first ran, so a job held
    longer than its deadline is not failed, and gets its RayCluster once resumed."""
    create_secret(cluster, cluster_namespace)
    document = gpu_document("held")
    document["spec"] |= {"suspend": True, "activeDeadlineSeconds": 10}
    cluster.create_bi(cluster_namespace, document)
    rayjob = naming.rayjob_name("held")

    def kuberay_status() -> dict[str, Any]:
        found = [r for r in cluster.ray(cluster_namespace, "rayjobs") if r["metadata"]["name"] == rayjob]
        return (found[0].get("status") or {}) if found else {}

    held = eventually(lambda: kuberay_status().get("jobDeploymentStatus") == "Suspended" and kuberay_status())
    assert held.get("startTime"), held  # what the operator used to take as the start
    time.sleep(10 + 3 * RESYNC_SECONDS)  # past the deadline, with resyncs that would have failed it
    bi = cluster.get_bi(cluster_namespace, "held")
    assert bi["status"]["phase"] == "Suspended" and "startTime" not in bi["status"], bi["status"]
    cluster.patch_bi(cluster_namespace, "held", {"spec": {"suspend": False}})
    eventually(lambda: cluster.ray(cluster_namespace, "rayclusters"), 60, "the resumed job's RayCluster")
    bi = cluster.get_bi(cluster_namespace, "held")
    assert bi["status"]["phase"] != "Failed", bi["status"]
