"""Owned RayJobs: mirror their status into the owning BatchInference, on every RayJob event and again on a
timer (kopf never retries event handlers, so a status write lost with the last event would stick), and end a
BatchInference whose deadline, counted across all attempts, has passed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import kopf
from kubernetes.client.rest import ApiException

from batchinfer_job import spec as s
from batchinfer_operator import kube, metrics
from batchinfer_operator.handlers.batchinference import GVR, SETTINGS, conditions_of, effective_spec_of, now, status_of
from batchinfer_operator.pod_problems import WAITING_REASONS, pod_problem
from batchinfer_operator.render import MANAGED_BY
from batchinfer_operator.status import WAITING_PHASES, conditions_for, is_terminal, status_from_rayjob

EVENTFUL_PHASES = ("Queued", "Running", "Retrying", "Succeeded", "Failed", "Suspended")
DEADLINE_REASON = "DeadlineExceeded"
_COMPARED = ("phase", "rayClusterName", "dashboardURL", "startTime", "completionTime", "reason", "message", "attempt")


def owner_name(body: kopf.Body) -> str | None:
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("kind") == s.KIND and ref.get("apiVersion", "").startswith(f"{s.API_GROUP}/"):
            return ref.get("name")
    return None


# kopf's callback protocols list every keyword it passes; handlers name the ones they use and take **_.
@kopf.on.event("ray.io", "v1", "rayjobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY})  # type: ignore[arg-type]
def mirror_rayjob(body: kopf.Body, type: str | None, namespace: str, logger: Any, **_: Any) -> None:
    if type == "DELETED":
        return  # TTL cleanup after the end; the BatchInference keeps its final status
    owner = owner_name(body)
    if owner is None:
        return
    metrics.RECONCILES.labels("rayjob").inc()
    try:
        sync_from_rayjob(dict(body), namespace, owner, logger)
    except kopf.PermanentError as err:
        if isinstance(err.__cause__, ApiException) and err.__cause__.status == 404:
            return  # owner gone; garbage collection removes this RayJob
        metrics.ERRORS.labels("rayjob").inc()
        raise
    except kopf.TemporaryError:
        metrics.ERRORS.labels("rayjob").inc()  # the resync timer writes it later
        raise


def sync_from_rayjob(rayjob: dict[str, Any], namespace: str, owner: str, logger: Any) -> None:
    """Write the BatchInference status that the RayJob's status implies (nothing when it already says so)."""

    def mirrored(bi: dict[str, Any]) -> dict[str, Any] | None:
        current = status_of(bi)
        current["conditions"] = conditions_of(current)
        update = status_from_rayjob(rayjob, current, now(), bi["metadata"].get("generation"))
        if current.get("phase") in ("Succeeded", "Failed") and update["phase"] != current.get("phase"):
            return None  # a finished BatchInference never goes back
        unchanged = all(update[k] == current.get(k) for k in _COMPARED if k in update)  # absent: left as is
        return None if unchanged and update["conditions"] == current.get("conditions") else update

    written = kube.update_batchinference_status(namespace, owner, mirrored)
    if written is None:
        return
    bi, update = written
    previous = bi["status"].get("phase") if isinstance(bi.get("status"), dict) else None
    if update["phase"] != previous:
        logger.info(f"phase {previous} -> {update['phase']}")
        if update["phase"] in EVENTFUL_PHASES:
            post = kopf.warn if update["phase"] == "Failed" else kopf.info
            detail = update.get("message") or f"RayJob {rayjob['metadata']['name']} is {update['phase']}"
            post(cast(kopf.Body, bi), reason=update["phase"], message=detail)  # kopf takes plain dicts too


def unfinished_with_rayjob(status: kopf.Status, **_: Any) -> bool:
    """Which BatchInferences the resync timer visits (kopf neither calls nor logs it for the others)."""
    return bool(status.get("rayJobName")) and not is_terminal(status.get("phase"))


@kopf.timer(  # type: ignore[arg-type]
    *GVR, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds, when=unfinished_with_rayjob
)
def resync(body: kopf.Body, status: kopf.Status, name: str, namespace: str, logger: Any, **_: Any) -> None:
    """Reconcile an unfinished BatchInference from its RayJob; end it once its deadline has passed."""
    metrics.RECONCILES.labels("resync").inc()
    try:
        effective = effective_spec_of(body)
        deadline = effective.activeDeadlineSeconds if effective else None
        if isinstance(deadline, int) and seconds_since(status.get("startTime")) > deadline:
            end_after_deadline(body, namespace, name, status["rayJobName"], deadline)
            return
        rayjob = kube.get_rayjob(namespace, status["rayJobName"])
        if rayjob is not None:
            sync_from_rayjob(rayjob, namespace, name, logger)
            report_waiting(body, namespace, name)
    except (kopf.PermanentError, kopf.TemporaryError):
        metrics.ERRORS.labels("resync").inc()
        raise


def report_waiting(body: kopf.Body, namespace: str, name: str) -> None:
    """While the job waits to run (Pending, Retrying), name why in its status reason and message, with an
    Event when that changes: the pods' stuck container or scheduling failure (`pod_problems`)."""

    def waiting(bi: dict[str, Any]) -> dict[str, Any] | None:
        current = status_of(bi)
        if current.get("phase") not in WAITING_PHASES:
            return None
        shown = current.get("reason") in WAITING_REASONS
        if problem is None:
            return {"reason": None, "message": None} if shown else None
        message = f"waiting to run: {problem.message}"
        if (current.get("reason"), current.get("message")) == (problem.reason, message):
            return None
        return {"reason": problem.reason, "message": message}

    if status_of(body).get("phase") not in WAITING_PHASES:
        return
    problem = pod_problem(kube.list_job_pods(namespace, name))
    written = kube.update_batchinference_status(namespace, name, waiting)
    if written is not None and problem is not None:
        kopf.warn(cast(kopf.Body, written[0]), reason=problem.reason, message=written[1]["message"])


def seconds_since(timestamp: Any) -> float:
    """Seconds since an RFC 3339 time; 0 when there is none."""
    if not isinstance(timestamp, str):
        return 0.0
    return (datetime.now(UTC) - datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds()


def end_after_deadline(body: kopf.Body, namespace: str, name: str, rayjob: str, deadline: int) -> None:
    """activeDeadlineSeconds counts from when the job first ran (not time queued or suspended; KubeRay resets its
    own start on every retry): delete
    the RayJob, which takes the RayCluster and its pods with it, and only once it is gone mark the BatchInference
    Failed. Until then (a refused delete, a RayJob still finalising) the resync timer tries again."""
    kube.delete_rayjob(namespace, rayjob)
    if kube.get_rayjob(namespace, rayjob) is not None:
        raise kopf.TemporaryError(
            f"activeDeadlineSeconds={deadline} passed; waiting for RayJob {rayjob} to go", delay=5
        )
    message = (
        f"activeDeadlineSeconds={deadline} passed since the job first ran "
        f"({status_of(body).get('startTime')}); the RayJob {rayjob} was stopped"
    )

    def failed(bi: dict[str, Any]) -> dict[str, Any] | None:
        current = status_of(bi)
        if is_terminal(current.get("phase")):
            return None
        generation = bi["metadata"].get("generation")
        conditions = conditions_for("Failed", DEADLINE_REASON, message, conditions_of(current), now(), generation)
        return {
            "phase": "Failed",
            "reason": DEADLINE_REASON,
            "message": message,
            "completionTime": now(),
            "conditions": conditions,
        }

    if kube.update_batchinference_status(namespace, name, failed) is not None:
        kopf.warn(body, reason="Failed", message=message)
