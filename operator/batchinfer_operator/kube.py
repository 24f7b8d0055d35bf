"""The few Kubernetes API calls the operator makes, wrapped once: 409 means "already there", transient
errors become `kopf.TemporaryError` (retried with backoff), the rest `kopf.PermanentError`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import kopf
import kubernetes
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from batchinfer_job import classes as c
from batchinfer_job import spec as s
from batchinfer_operator import naming
from batchinfer_operator.render import NAME_LABEL

TRANSIENT_STATUSES = {408, 410, 425, 429, 500, 502, 503, 504}
# Who wrote what, in every object's managedFields (`kubectl get -o yaml --show-managed-fields`).
FIELD_MANAGER = "batchinfer-operator"
RETRY_DELAY = float(os.environ.get("BATCHINFER_API_RETRY_SECONDS", "10"))


def configure_client() -> None:
    """In-cluster credentials when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


@contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Translate API failures into kopf's retry semantics, naming what was being done."""
    try:
        yield
    except ApiException as err:
        detail = f"{what}: HTTP {err.status} {err.reason}: {(err.body or '')[:300]}"
        if err.status in TRANSIENT_STATUSES:
            raise kopf.TemporaryError(detail, delay=RETRY_DELAY) from err
        raise kopf.PermanentError(detail) from err
    except (HTTPError, OSError) as err:  # connection refused/reset, timeouts
        raise kopf.TemporaryError(f"{what}: {err}", delay=RETRY_DELAY) from err


def _api(kind: str) -> tuple[Callable[[str, dict[str, Any]], Any], Callable[[str, str], Any]]:
    """(create(namespace, body), read(name, namespace)) for a child kind."""
    core, rbac = kubernetes.client.CoreV1Api(), kubernetes.client.RbacAuthorizationV1Api()
    custom = kubernetes.client.CustomObjectsApi()
    creates_and_reads = {
        "ConfigMap": (core.create_namespaced_config_map, core.read_namespaced_config_map),
        "ServiceAccount": (core.create_namespaced_service_account, core.read_namespaced_service_account),
        "Role": (rbac.create_namespaced_role, rbac.read_namespaced_role),
        "RoleBinding": (rbac.create_namespaced_role_binding, rbac.read_namespaced_role_binding),
        "RayJob": (
            lambda ns, body, **kw: custom.create_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", body, **kw),
            lambda name, ns: custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", name),
        ),
    }
    create, read = creates_and_reads[kind]
    return partial(create, field_manager=FIELD_MANAGER), read


def _owner_uids(obj: Any) -> set[str]:
    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
    refs = meta.get("ownerReferences") if isinstance(meta, dict) else meta.owner_references
    return {(r["uid"] if isinstance(r, dict) else r.uid) for r in refs or []}


def create_or_adopt(child: dict[str, Any], owner_uid: str) -> str:
    """Create a child; if it exists already and is ours, keep it. Returns "created" or "existing"."""
    kind, name, namespace = child["kind"], child["metadata"]["name"], child["metadata"]["namespace"]
    try:
        with api_errors(f"create {kind} {namespace}/{name}"):
            _api(kind)[0](namespace, child)
        return "created"
    except kopf.PermanentError as err:
        if not isinstance(err.__cause__, ApiException) or err.__cause__.status != 409:
            raise
    with api_errors(f"read existing {kind} {namespace}/{name}"):
        existing = _api(kind)[1](name, namespace)
    if owner_uid not in _owner_uids(existing):
        raise kopf.PermanentError(
            f"{kind} {namespace}/{name} already exists and is not owned by this BatchInference; "
            "delete it or rename the BatchInference"
        )
    return "existing"


def list_classes() -> list[dict[str, Any]]:
    """Every BatchInferenceClass (cluster-scoped), as stored."""
    with api_errors("list BatchInferenceClasses"):
        found = kubernetes.client.CustomObjectsApi().list_cluster_custom_object(s.API_GROUP, s.API_VERSION, c.PLURAL)
    return list(found.get("items") or [])


def get_batchinference(namespace: str, name: str) -> dict[str, Any]:
    with api_errors(f"read BatchInference {namespace}/{name}"):
        return kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
            s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, name
        )


CONFLICT_ATTEMPTS = 5


def update_batchinference_status(
    namespace: str, name: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Read-modify-write of a BatchInference's status, safe against concurrent writers.

    `change(bi)` returns the status fields to set (or None: nothing to do). The patch carries the
    resourceVersion it was computed from, so the API server refuses it (409) if another writer got in
    between — conditions are a list, and a merge patch built from a stale read would drop theirs; then it
    is computed again from a fresh read. Returns (the object it was computed from, the update), or None.
    """
    for _ in range(CONFLICT_ATTEMPTS):
        bi = get_batchinference(namespace, name)
        update = change(bi)
        if update is None:
            return None
        patch = {"metadata": {"resourceVersion": bi["metadata"]["resourceVersion"]}, "status": update}
        try:
            with api_errors(f"patch status of BatchInference {namespace}/{name}"):
                kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
                    s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, name, patch, field_manager=FIELD_MANAGER
                )
            return bi, update
        except kopf.PermanentError as err:
            if not isinstance(err.__cause__, ApiException) or err.__cause__.status != 409:
                raise
    raise kopf.TemporaryError(
        f"patch status of BatchInference {namespace}/{name}: {CONFLICT_ATTEMPTS} conflicting writes in a row",
        delay=RETRY_DELAY,
    )


def patch_rayjob_suspend(namespace: str, name: str, suspend: bool) -> None:
    with api_errors(f"patch suspend of RayJob {namespace}/{name}"):
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayjobs", name, {"spec": {"suspend": suspend}}, field_manager=FIELD_MANAGER
        )


def get_rayjob(namespace: str, name: str) -> dict[str, Any] | None:
    """The RayJob, or None when it does not exist."""
    try:
        with api_errors(f"read RayJob {namespace}/{name}"):
            return kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
                "ray.io", "v1", namespace, "rayjobs", name
            )
    except kopf.PermanentError as err:
        if isinstance(err.__cause__, ApiException) and err.__cause__.status == 404:
            return None
        raise


def delete_rayjob(namespace: str, name: str) -> None:
    """Delete a RayJob and, through garbage collection, its RayCluster and pods (gone already is fine)."""
    try:
        with api_errors(f"delete RayJob {namespace}/{name}"):
            kubernetes.client.CustomObjectsApi().delete_namespaced_custom_object(
                "ray.io", "v1", namespace, "rayjobs", name, propagation_policy="Background"
            )
    except kopf.PermanentError as err:
        if not isinstance(err.__cause__, ApiException) or err.__cause__.status != 404:
            raise


def list_job_pods(namespace: str, name: str) -> list[dict[str, Any]]:
    """Every pod of a BatchInference's job (Ray head and workers, the submitter), as plain dicts."""
    selector = f"{NAME_LABEL}={naming.label_value(name)}"
    with api_errors(f"list pods of BatchInference {namespace}/{name}"):
        pods = kubernetes.client.CoreV1Api().list_namespaced_pod(namespace, label_selector=selector)
    return [kubernetes.client.ApiClient().sanitize_for_serialization(p) for p in pods.items]
