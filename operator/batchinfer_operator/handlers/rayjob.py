"""Owned RayJobs: mirror their status into the owning BatchInference."""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from batchinfer_job import spec as s
from batchinfer_operator import kube, metrics
from batchinfer_operator.handlers.batchinference import conditions_of, now
from batchinfer_operator.render import MANAGED_BY
from batchinfer_operator.status import status_from_rayjob

EVENTFUL_PHASES = ("Running", "Succeeded", "Failed", "Suspended")
_COMPARED = ("phase", "rayClusterName", "dashboardURL", "startTime", "completionTime", "reason", "message")


def owner_name(body: kopf.Body) -> str | None:
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("kind") == s.KIND and ref.get("apiVersion", "").startswith(f"{s.API_GROUP}/"):
            return ref.get("name")
    return None


@kopf.on.event("ray.io", "v1", "rayjobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def mirror_rayjob(body: kopf.Body, type: str | None, namespace: str, logger: Any, **_: Any) -> None:
    if type == "DELETED":
        return  # TTL cleanup after the end; the BatchInference keeps its final status
    owner = owner_name(body)
    if owner is None:
        return
    metrics.RECONCILES.labels("rayjob").inc()
    try:
        bi = kube.get_batchinference(namespace, owner)
    except kopf.PermanentError as err:
        if isinstance(err.__cause__, ApiException) and err.__cause__.status == 404:
            return  # owner gone; garbage collection removes this RayJob
        metrics.ERRORS.labels("rayjob").inc()
        raise
    current = bi.get("status") if isinstance(bi.get("status"), dict) else {}
    current = {**current, "conditions": conditions_of(current)}
    update = status_from_rayjob(dict(body), current, now(), bi["metadata"].get("generation"))
    if current.get("phase") in ("Succeeded", "Failed") and update["phase"] != current.get("phase"):
        return  # a finished BatchInference never goes back
    if all(update.get(k) == current.get(k) for k in _COMPARED) and update["conditions"] == current.get("conditions"):
        return
    kube.patch_batchinference_status(namespace, owner, update)
    if update["phase"] != current.get("phase"):
        logger.info(f"phase {current.get('phase')} -> {update['phase']}")
        if update["phase"] in EVENTFUL_PHASES:
            post = kopf.warn if update["phase"] == "Failed" else kopf.info
            detail = update.get("message") or f"RayJob {body.metadata['name']} is {update['phase']}"
            post(bi, reason=update["phase"], message=detail)
