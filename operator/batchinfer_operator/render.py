"""Pure rendering: a BatchInference spec becomes its child manifests (no API calls).

Children: a ConfigMap with the job's spec as data, a ServiceAccount + Role + RoleBinding that let the job
patch its own BatchInference's status (progress), and the KubeRay `ray.io/v1` RayJob. The RayJob's
entrypoint is a constant: the job reads everything from the mounted ConfigMap, so no spec value ever
reaches a shell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from batchinfer_job import spec as s
from batchinfer_operator import naming
from batchinfer_operator.settings import OperatorSettings

SPEC_DIR = "/etc/batchinfer"
SPEC_FILE = "spec.json"
ENTRYPOINT = f"python -m batchinfer_job.entrypoint --spec {SPEC_DIR}/{SPEC_FILE}"
MANAGED_BY = "batchinfer-operator"
NAME_LABEL = "batchinfer.dev/name"
KUEUE_QUEUE_LABEL = naming.KUEUE_QUEUE_LABEL


@dataclass(frozen=True)
class Owner:
    """The BatchInference the children belong to."""

    name: str
    namespace: str


def common_labels(owner: Owner) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "batchinfer",
        "app.kubernetes.io/instance": naming.label_value(owner.name),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        NAME_LABEL: naming.label_value(owner.name),
    }


def _meta(name: str, owner: Owner, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": {**common_labels(owner), **(extra_labels or {})}}


def job_document(spec: s.BatchInferenceSpec, owner: Owner) -> dict[str, Any]:
    """What the job reads: its own identity (for status updates) and the validated spec."""
    return {
        "apiVersion": f"{s.API_GROUP}/{s.API_VERSION}",
        "kind": s.KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace},
        "spec": spec.model_dump(mode="json", exclude_none=True),
    }


def render_configmap(spec: s.BatchInferenceSpec, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(naming.child_name(owner.name, "job"), owner),
        "data": {SPEC_FILE: json.dumps(job_document(spec, owner), indent=2, sort_keys=True)},
    }


def service_account_name(spec: s.BatchInferenceSpec, owner: Owner) -> str:
    return spec.cluster.serviceAccountName or naming.runner_account_name(owner.name)


def render_rbac(spec: s.BatchInferenceSpec, owner: Owner) -> list[dict[str, Any]]:
    """ServiceAccount (unless the spec names one), a Role to patch this one BatchInference's status, binding."""
    sa = service_account_name(spec, owner)
    role = naming.child_name(owner.name, "progress")
    docs: list[dict[str, Any]] = []
    if spec.cluster.serviceAccountName is None:
        docs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(sa, owner)})
    docs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(role, owner),
            "rules": [
                {
                    "apiGroups": [s.API_GROUP],
                    "resources": [f"{s.PLURAL}/status"],
                    "resourceNames": [owner.name],
                    "verbs": ["get", "patch"],
                }
            ],
        }
    )
    docs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(role, owner),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": owner.namespace}],
        }
    )
    return docs


TASK_OOM_RETRIES = 3  # the job's decode tasks and model actors retry as often (batchinfer_job.pipeline)


def _env(spec: s.BatchInferenceSpec, owner: Owner) -> list[dict[str, Any]]:
    env = [
        {"name": "BATCHINFER_NAME", "value": owner.name},
        {"name": "BATCHINFER_NAMESPACE", "value": owner.namespace},
        # Ray retries a task its memory monitor kills without end by default: a poisoned input would loop.
        {"name": "RAY_task_oom_retries", "value": str(TASK_OOM_RETRIES)},
    ]
    if spec.storage.endpointUrl:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpointUrl})
    if spec.storage.region:
        env += [
            {"name": "AWS_REGION", "value": spec.storage.region},
            {"name": "AWS_DEFAULT_REGION", "value": spec.storage.region},
        ]
    return env


def _resources(res: s.Resources, gpus: int) -> dict[str, Any]:
    amounts = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = dict(amounts)
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": amounts, "limits": limits}


# What Pod Security `restricted` asks of every container; each container KubeRay makes for us carries it.
HARDENED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
SUBMITTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}


def _container(
    name: str, spec: s.BatchInferenceSpec, owner: Owner, settings: OperatorSettings, resources: dict[str, Any]
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": spec.cluster.image or settings.job_image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": _env(spec, owner),
        "resources": resources,
        "volumeMounts": [{"name": "batchinfer-job", "mountPath": SPEC_DIR, "readOnly": True}],
        "securityContext": dict(HARDENED),
    }
    if spec.storage.secretRef is not None:
        container["envFrom"] = [{"secretRef": {"name": spec.storage.secretRef.name}}]
    return container


def _pod_template(
    spec: s.BatchInferenceSpec,
    owner: Owner,
    container: dict[str, Any],
    labels: dict[str, str],
    placement: s.HeadSchedulingSpec | s.SchedulingSpec,
    *,
    token: bool,
) -> dict[str, Any]:
    """A Ray pod. `token`: whether the ServiceAccount's token is mounted (only the head needs one: it patches
    progress and runs the autoscaler; user predictor code on workers gets no API credentials)."""
    pod: dict[str, Any] = {
        "serviceAccountName": service_account_name(spec, owner),
        "containers": [container],
        "volumes": [{"name": "batchinfer-job", "configMap": {"name": naming.child_name(owner.name, "job")}}],
    }
    if not token:
        pod["automountServiceAccountToken"] = False
    pod.update(_pull_secrets(spec))
    if placement.nodeSelector:
        pod["nodeSelector"] = dict(placement.nodeSelector)
    if placement.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", exclude_none=True) for t in placement.tolerations]
    if placement.affinity:
        pod["affinity"] = placement.affinity.model_dump(mode="json", exclude_none=True)
    if spec.scheduling.priorityClassName:
        pod["priorityClassName"] = spec.scheduling.priorityClassName
    return {"metadata": {"labels": labels}, "spec": pod}


def _pull_secrets(spec: s.BatchInferenceSpec) -> dict[str, Any]:
    secrets = spec.cluster.imagePullSecrets or []
    return {"imagePullSecrets": [{"name": ref.name} for ref in secrets]} if secrets else {}


def _submitter_template(
    spec: s.BatchInferenceSpec, owner: Owner, settings: OperatorSettings, labels: dict[str, str]
) -> dict[str, Any]:
    """The pod that submits the job to the cluster (KubeRay fills in its command): small, hardened, the job's
    ServiceAccount without its token (`ray job submit` talks to the dashboard, not the API server), and no GPU
    node selector or tolerations, so it lands on an ordinary CPU node."""
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account_name(spec, owner),
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "ray-job-submitter",
                "image": spec.cluster.image or settings.job_image,
                "imagePullPolicy": settings.image_pull_policy,
                "resources": SUBMITTER_RESOURCES,
                "securityContext": dict(HARDENED),
            }
        ],
    }
    pod.update(_pull_secrets(spec))
    if spec.scheduling.priorityClassName:
        pod["priorityClassName"] = spec.scheduling.priorityClassName
    return {"metadata": {"labels": labels}, "spec": pod}


def render_rayjob(spec: s.BatchInferenceSpec, owner: Owner, settings: OperatorSettings) -> dict[str, Any]:
    """The KubeRay v1.7.0 RayJob (ray.io/v1)."""
    labels = common_labels(owner)
    job_labels = dict(labels)
    if spec.scheduling.queueName:
        job_labels[KUEUE_QUEUE_LABEL] = spec.scheduling.queueName
    head = _container("ray-head", spec, owner, settings, _resources(spec.cluster.head, gpus=spec.cluster.head.gpu))
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    workers = spec.cluster.workers
    worker = _container("ray-worker", spec, owner, settings, _resources(workers.resources, s.worker_gpus(spec)))
    rayjob_spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": spec.ttlSecondsAfterFinished,
        "backoffLimit": spec.backoffLimit,
        # KubeRay fails an attempt not Running this long after its cluster began initializing (retried within
        # backoffLimit); the operator names the pod-level reason meanwhile (handlers/rayjob.py).
        "preRunningDeadlineSeconds": spec.preRunningDeadlineSeconds,
        "suspend": spec.suspend,
        "submitterPodTemplate": _submitter_template(spec, owner, settings, labels),
        "rayClusterSpec": {
            "rayVersion": spec.cluster.rayVersion or settings.ray_version,
            "enableInTreeAutoscaling": spec.cluster.enableInTreeAutoscaling,
            "headGroupSpec": {
                # The head schedules no tasks: decode and model actors go to workers; the driver runs here.
                "rayStartParams": {"num-cpus": "0"},
                "template": _pod_template(spec, owner, head, labels, spec.scheduling.head, token=True),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": workers.replicas,
                    "minReplicas": workers.minReplicas,
                    "maxReplicas": workers.maxReplicas,
                    "rayStartParams": {},
                    "template": _pod_template(spec, owner, worker, labels, spec.scheduling, token=False),
                }
            ],
        },
    }
    if spec.cluster.enableInTreeAutoscaling:  # the autoscaler sidecar KubeRay adds to the head pod
        rayjob_spec["rayClusterSpec"]["autoscalerOptions"] = {"securityContext": dict(HARDENED)}
    if spec.activeDeadlineSeconds is not None:
        rayjob_spec["activeDeadlineSeconds"] = spec.activeDeadlineSeconds
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(naming.rayjob_name(owner.name), owner, job_labels),
        "spec": rayjob_spec,
    }


def render_children(spec: s.BatchInferenceSpec, owner: Owner, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Everything the operator creates for one BatchInference, in creation order (RayJob last).

    A JSON round trip leaves no two places sharing a dict (callers may mutate; YAML gets no anchors).
    """
    children = [render_configmap(spec, owner), *render_rbac(spec, owner), render_rayjob(spec, owner, settings)]
    return json.loads(json.dumps(children))
