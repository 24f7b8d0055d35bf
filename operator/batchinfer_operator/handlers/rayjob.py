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

    def mirrored(bi: dict[str, Any]) -> dict[str, Any] | None:
        current = bi.get("status") if isinstance(bi.get("status"), dict) else {}
        current = {**current, "conditions": conditions_of(current)}
        update = status_from_rayjob(dict(body), current, now(), bi["metadata"].get("generation"))
        if current.get("phase") in ("Succeeded", "Failed") and update["phase"] != current.get("phase"):
            return None  # a finished BatchInference never goes back
        unchanged = all(update.get(k) == current.get(k) for k in _COMPARED)
        return None if unchanged and update["conditions"] == current.get("conditions") else update

    try:
        written = kube.update_batchinference_status(namespace, owner, mirrored)
    except kopf.PermanentError as err:
        if isinstance(err.__cause__, ApiException) and err.__cause__.status == 404:
            return  # owner gone; garbage collection removes this RayJob
        metrics.ERRORS.labels("rayjob").inc()
        raise
    if written is None:
        return
    bi, update = written
    previous = bi["status"].get("phase") if isinstance(bi.get("status"), dict) else None
    if update["phase"] != previous:
        logger.info(f"phase {previous} -> {update['phase']}")
        if update["phase"] in EVENTFUL_PHASES:
            post = kopf.warn if update["phase"] == "Failed" else kopf.info
            detail = update.get("message") or f"RayJob {body.metadata['name']} is {update['phase']}"
            post(bi, reason=update["phase"], message=detail)
