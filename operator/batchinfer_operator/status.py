"""Pure status mapping: a RayJob's status becomes the BatchInference's phase, conditions and times.

Only `jobDeploymentStatus: Complete` with `jobStatus: SUCCEEDED` is success: a stopped job also ends as
Complete, and `jobStatus` can lag behind the deployment status (kuberay#2314), in which case the phase
stays Running until it catches up.
"""

from __future__ import annotations

from typing import Any

from batchinfer_operator import naming
from batchinfer_operator.pod_problems import WAITING_REASONS

FAILED_DEPLOYMENTS = {"Failed", "ValidationFailed"}
SUSPENDED_DEPLOYMENTS = {"Suspended", "Suspending"}
TERMINAL_JOB_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}
CONDITION_TYPES = ("Running", "Succeeded", "Failed")


def phase_of(rayjob_status: dict[str, Any]) -> str:
    deployment = rayjob_status.get("jobDeploymentStatus") or ""
    job = rayjob_status.get("jobStatus") or ""
    if deployment in FAILED_DEPLOYMENTS:
        return "Failed"
    if deployment in SUSPENDED_DEPLOYMENTS:
        return "Suspended"
    if deployment == "Complete":
        if job == "SUCCEEDED":
            return "Succeeded"
        if job in TERMINAL_JOB_STATUSES:
            return "Failed"
        return "Running"  # jobStatus lags: do not claim success or failure yet
    if deployment == "Running":
        return "Running"
    if deployment == "Retrying":  # an attempt failed and backoffLimit allows another
        return "Retrying"
    return "Pending"


STATUS_CHECK_TIMEOUT = "JobStatusCheckTimeoutExceeded"
PRE_RUNNING_DEADLINE = "PreRunningDeadlineExceeded"
WAITING_PHASES = ("Pending", "Retrying")  # the job waits for its cluster: pod-level reasons are shown


def _status_check_timeout_message(kuberay_message: str) -> str:
    return (
        f"KubeRay could not reach the Ray dashboard to check the job ({kuberay_message or 'no detail'}). KubeRay "
        "v1.7.0 fails a RayJob for good after 300 s of failed checks and never retries it, whatever backoffLimit "
        "says. Usual causes: the head pod was OOM-killed, evicted or restarted, or a NetworkPolicy blocks KubeRay "
        "from the head's port 8265. Fix that, then create the BatchInference again with the same output.uri: "
        "committed shards are kept and only unfinished inputs are read again"
    )


def _reason_message(phase: str, rayjob_status: dict[str, Any]) -> tuple[str, str]:
    deployment = rayjob_status.get("jobDeploymentStatus") or "New"
    job = rayjob_status.get("jobStatus") or "PENDING"
    if phase == "Failed":
        reason = rayjob_status.get("reason") or ("JobStopped" if job == "STOPPED" else f"Job{job.capitalize()}")
        message = rayjob_status.get("message") or f"RayJob ended with jobStatus {job} ({deployment})"
        if reason == STATUS_CHECK_TIMEOUT:
            message = _status_check_timeout_message(rayjob_status.get("message") or "")
        return reason, message
    if phase == "Succeeded":
        return "JobSucceeded", "all inputs processed; predictions committed"
    return deployment, rayjob_status.get("message") or f"RayJob {deployment.lower()}, jobStatus {job}"


def conditions_for(
    phase: str, reason: str, message: str, previous: list[dict[str, Any]] | None, now: str, generation: int | None
) -> list[dict[str, Any]]:
    """Running/Succeeded/Failed conditions; lastTransitionTime changes only when a status flips."""
    before = {c.get("type"): c for c in previous or []}
    truth = {"Running": phase == "Running", "Succeeded": phase == "Succeeded", "Failed": phase == "Failed"}
    out = [c for c in previous or [] if c.get("type") not in CONDITION_TYPES]
    for kind in CONDITION_TYPES:
        status = "True" if truth[kind] else "False"
        old = before.get(kind, {})
        unchanged = old.get("status") == status
        if truth[kind]:
            why, detail = reason, message
        elif unchanged:
            why, detail = old.get("reason") or reason, old.get("message", "")
        else:
            why, detail = reason, ""
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": why,
                "message": detail,
                "lastTransitionTime": old.get("lastTransitionTime") if unchanged else now,
                "observedGeneration": generation,
            }
        )
    return out


QUEUED_REASON = "WaitingForKueue"


def queue_of(rayjob: dict[str, Any]) -> str | None:
    """The Kueue LocalQueue a RayJob is queued in (its queue-name label), if any."""
    return ((rayjob.get("metadata") or {}).get("labels") or {}).get(naming.KUEUE_QUEUE_LABEL)


def queued_message(queue: str) -> str:
    return (
        f"waiting for Kueue to admit it from LocalQueue {queue!r}: Kueue unsuspends the RayJob once that queue's "
        "ClusterQueue has quota for all of its pods (kubectl get workloads in this namespace says what is missing); "
        "activeDeadlineSeconds does not count this wait"
    )


def status_from_rayjob(
    rayjob: dict[str, Any], current: dict[str, Any] | None, now: str, generation: int | None
) -> dict[str, Any]:
    """The BatchInference status patch for a RayJob's current state. A suspended RayJob with a Kueue queue label
    is Queued: Kueue holds it until its ClusterQueue admits it (it suspends it again when it evicts it)."""
    rj_status = rayjob.get("status") or {}
    current = current or {}
    phase = phase_of(rj_status)
    queue = queue_of(rayjob)
    held = phase == "Suspended" or (phase == "Pending" and (rayjob.get("spec") or {}).get("suspend") is True)
    if queue and held:
        phase = "Queued"
        reason, message = QUEUED_REASON, queued_message(queue)
    else:
        reason, message = _reason_message(phase, rj_status)
    patch: dict[str, Any] = {
        "phase": phase,
        "rayJobName": rayjob["metadata"]["name"],
        "conditions": conditions_for(phase, reason, message, current.get("conditions"), now, generation),
    }
    if rj_status.get("rayClusterName"):
        patch["rayClusterName"] = rj_status["rayClusterName"]
    if rj_status.get("dashboardURL"):
        patch["dashboardURL"] = dashboard_url(rj_status["dashboardURL"])
    ran_at = (rj_status.get("rayJobInfo") or {}).get("startTime") or rj_status.get("startTime")
    if ran_at and not current.get("startTime") and has_run(rj_status):
        # When the job first ran (the Ray job's own start, from the dashboard, where KubeRay has it): KubeRay's
        # status.startTime is set on a RayJob held suspended (queued in Kueue) too, and on each retry;
        # activeDeadlineSeconds counts from the first attempt that ran.
        patch["startTime"] = ran_at
    if isinstance(rj_status.get("failed"), int):
        patch["attempt"] = rj_status["failed"] + (0 if phase == "Failed" else 1)
    if phase in ("Succeeded", "Failed"):
        patch["completionTime"] = rj_status.get("endTime") or current.get("completionTime") or now
    waited = current.get("reason") in WAITING_REASONS  # the pods' reason, written while the job waited to run
    if phase == "Failed":
        if waited and reason == PRE_RUNNING_DEADLINE:
            message = f"{message}; the job was waiting on: {current.get('message')}"
        patch["reason"], patch["message"] = reason, message
    elif phase == "Queued":
        patch["reason"], patch["message"] = reason, message
    elif current.get("reason") == QUEUED_REASON or (waited and phase not in WAITING_PHASES):
        patch["reason"], patch["message"] = None, None  # admitted, or it runs now: the wait is over
    return patch


def has_run(rayjob_status: dict[str, Any]) -> bool:
    """Whether the Ray job of this attempt started: its jobStatus left NEW/PENDING (KubeRay then reports the
    Ray job's own start as startTime). Suspended and initializing RayJobs have not."""
    return (rayjob_status.get("jobStatus") or "") in ("RUNNING", *TERMINAL_JOB_STATUSES)


def dashboard_url(address: str) -> str:
    """KubeRay reports the dashboard as host:port; status carries a URL."""
    return address if "://" in address else f"http://{address}"


def is_terminal(phase: str | None) -> bool:
    return phase in ("Succeeded", "Failed")
