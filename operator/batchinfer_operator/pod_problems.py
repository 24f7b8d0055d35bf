"""Pure: why a job's pods are not running yet, from their status (the kubelet's and the scheduler's words).

The operator shows it as the BatchInference's reason and message while the job waits to run, so that an image
that cannot be pulled, a missing Secret or GPU pods that never schedule are named, not left as "initializing".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Container waiting reasons that mean "this will not start by itself soon" (kubelet's names).
STUCK_CONTAINER_REASONS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
)
UNSCHEDULABLE = "Unschedulable"
WAITING_REASONS = (*STUCK_CONTAINER_REASONS, UNSCHEDULABLE)


@dataclass(frozen=True)
class PodProblem:
    reason: str  # a kubelet waiting reason, or Unschedulable
    message: str  # one line: which pod, which container, the kubelet's or scheduler's own message


def _container_problem(pod_name: str, pod_status: dict[str, Any]) -> PodProblem | None:
    for kind in ("initContainerStatuses", "containerStatuses"):
        for container in pod_status.get(kind) or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in STUCK_CONTAINER_REASONS:
                detail = " ".join(str(waiting.get("message") or "").split())
                text = f"pod {pod_name}, container {container.get('name')}: {reason}" + (
                    f": {detail}" if detail else ""
                )
                return PodProblem(reason, text)
    return None


def _scheduling_problem(pod_name: str, pod_status: dict[str, Any]) -> PodProblem | None:
    for condition in pod_status.get("conditions") or []:
        scheduled = (condition.get("type"), condition.get("status"), condition.get("reason"))
        if scheduled == ("PodScheduled", "False", UNSCHEDULABLE):
            detail = " ".join(str(condition.get("message") or "").split())
            return PodProblem(UNSCHEDULABLE, f"pod {pod_name}: {UNSCHEDULABLE}: {detail}")
    return None


def pod_problem(pods: list[dict[str, Any]]) -> PodProblem | None:
    """The first stuck container (by pod name), else the first unschedulable pod, else None."""
    ordered = sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name") or "")
    for finder in (_container_problem, _scheduling_problem):
        for pod in ordered:
            found = finder((pod.get("metadata") or {}).get("name") or "?", pod.get("status") or {})
            if found:
                return found
    return None
