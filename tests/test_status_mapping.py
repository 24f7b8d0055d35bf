"""RayJob status → BatchInference status, the way KubeRay moves a RayJob."""

from __future__ import annotations

import pytest

from batchinfer_operator.status import phase_of, status_from_rayjob


@pytest.mark.parametrize(
    ("deployment", "job", "phase"),
    [
        ("", "", "Pending"),
        ("New", "", "Pending"),
        ("Initializing", "PENDING", "Pending"),
        ("Running", "RUNNING", "Running"),
        ("Complete", "SUCCEEDED", "Succeeded"),
        ("Complete", "STOPPED", "Failed"),  # a stopped job also ends as Complete
        ("Complete", "FAILED", "Failed"),
        ("Complete", "RUNNING", "Running"),  # jobStatus lags (kuberay#2314): not success yet
        ("Failed", "FAILED", "Failed"),
        ("ValidationFailed", "", "Failed"),
        ("Suspended", "", "Suspended"),
        ("Retrying", "FAILED", "Retrying"),
    ],
)
def test_phase_of(deployment: str, job: str, phase: str) -> None:
    assert phase_of({"jobDeploymentStatus": deployment, "jobStatus": job}) == phase


def rayjob(**status: str) -> dict:
    return {"metadata": {"name": "rj"}, "status": status}


def test_failure_carries_reason_message_and_completion_time() -> None:
    out = status_from_rayjob(
        rayjob(
            jobDeploymentStatus="Failed",
            jobStatus="FAILED",
            reason="DeadlineExceeded",
            message="activeDeadlineSeconds passed",
            startTime="2026-01-01T00:00:00Z",
            endTime="2026-01-01T01:00:00Z",
        ),
        None,
        "2026-01-01T01:00:01Z",
        1,
    )
    assert out["phase"] == "Failed"
    assert (out["reason"], out["message"]) == ("DeadlineExceeded", "activeDeadlineSeconds passed")
    assert out["completionTime"] == "2026-01-01T01:00:00Z" and out["startTime"] == "2026-01-01T00:00:00Z"
    failed = next(c for c in out["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "DeadlineExceeded"


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    first = status_from_rayjob(rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING"), None, "T1", 1)
    again = status_from_rayjob(rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING"), first, "T2", 1)
    done = status_from_rayjob(rayjob(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"), again, "T3", 1)
    running = {
        s: next(c for c in st["conditions"] if c["type"] == "Running")
        for s, st in (("first", first), ("again", again), ("done", done))
    }
    assert running["first"]["lastTransitionTime"] == running["again"]["lastTransitionTime"] == "T1"
    assert running["done"]["status"] == "False" and running["done"]["lastTransitionTime"] == "T3"
    assert next(c for c in done["conditions"] if c["type"] == "Succeeded")["status"] == "True"


def test_a_retry_shows_its_attempt_and_keeps_the_first_start_time() -> None:
    first = status_from_rayjob(
        rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING", startTime="T1", failed=0), {}, "now", 1
    )
    assert (first["phase"], first["attempt"], first["startTime"]) == ("Running", 1, "T1")
    retrying = status_from_rayjob(rayjob(jobDeploymentStatus="Retrying", startTime="T2", failed=1), first, "now", 1)
    assert (retrying["phase"], retrying["attempt"]) == ("Retrying", 2)
    assert "startTime" not in retrying  # KubeRay reset it for the new attempt; the first one's stays


def test_time_suspended_queued_or_starting_pods_is_not_the_start() -> None:
    """KubeRay sets startTime when a RayJob initializes, suspended or not: the start is the Ray job's."""
    held = status_from_rayjob(rayjob(jobDeploymentStatus="Suspended", jobStatus="NEW", startTime="T0"), {}, "n", 1)
    starting = status_from_rayjob(rayjob(jobDeploymentStatus="Initializing", startTime="T1"), held, "n", 1)
    submitted = status_from_rayjob(
        rayjob(jobDeploymentStatus="Running", jobStatus="PENDING", startTime="T1"), starting, "n", 1
    )
    assert [x.get("startTime") for x in (held, starting, submitted)] == [None, None, None]
    ran = status_from_rayjob(rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING", startTime="T2"), {}, "n", 1)
    assert ran["startTime"] == "T2"
    reported = rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING", startTime="T2")
    reported["status"]["rayJobInfo"] = {"startTime": "T3"}  # the Ray job's own start, from the dashboard
    assert status_from_rayjob(reported, {}, "n", 1)["startTime"] == "T3"


def test_the_dashboard_address_becomes_a_url() -> None:
    out = status_from_rayjob(rayjob(jobDeploymentStatus="Running", dashboardURL="rj-head-svc.ns.svc:8265"), {}, "n", 1)
    assert out["dashboardURL"] == "http://rj-head-svc.ns.svc:8265"


def test_kuberays_status_check_timeout_says_it_is_final_and_what_to_do() -> None:
    """KubeRay v1.7.0 fails a RayJob for good after 300 s without its dashboard (never retried)."""
    kuberay_message = "Job status checks have been failing since 2026-12-01 10:00:00; exceeded timeout of 300s"
    out = status_from_rayjob(
        rayjob(
            jobDeploymentStatus="Failed",
            jobStatus="RUNNING",
            reason="JobStatusCheckTimeoutExceeded",
            message=kuberay_message,
            failed=0,
        ),
        {"phase": "Running"},
        "n",
        1,
    )
    assert (out["phase"], out["reason"]) == ("Failed", "JobStatusCheckTimeoutExceeded")
    assert kuberay_message in out["message"]
    for words in ("never retries it, whatever backoffLimit", "head pod", "port 8265", "same output.uri"):
        assert words in out["message"], words


def test_the_pods_reason_shown_while_waiting_is_cleared_once_running_and_kept_if_the_wait_fails() -> None:
    waited = {"phase": "Pending", "reason": "ImagePullBackOff", "message": "waiting to run: pod h: ImagePullBackOff"}
    running = status_from_rayjob(rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING"), waited, "n", 1)
    assert (running["reason"], running["message"]) == (None, None)  # a merge patch removes them
    still = status_from_rayjob(rayjob(jobDeploymentStatus="Initializing"), waited, "n", 1)
    assert "reason" not in still and "message" not in still  # the operator's pod check owns them meanwhile
    kuberay = "The RayJob has passed the preRunningDeadlineSeconds. StartTime: x. PreRunningDeadlineSeconds: 60"
    failed = status_from_rayjob(
        rayjob(jobDeploymentStatus="Failed", reason="PreRunningDeadlineExceeded", message=kuberay), waited, "n", 1
    )
    assert failed["reason"] == "PreRunningDeadlineExceeded"
    assert failed["message"] == f"{kuberay}; the job was waiting on: waiting to run: pod h: ImagePullBackOff"


def queued_rayjob(deployment: str, job: str = "NEW", suspend: bool = True) -> dict:
    body = rayjob(jobDeploymentStatus=deployment, jobStatus=job, startTime="2026-01-01T00:00:00Z")
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-ml"}
    body["spec"] = {"suspend": suspend}
    return body


def test_a_rayjob_kueue_holds_is_queued_and_says_for_which_queue() -> None:
    """Kueue's webhook creates a queued RayJob suspended; KubeRay then goes New → Initializing → Suspended."""
    for deployment in ("", "Initializing", "Suspending", "Suspended"):
        update = status_from_rayjob(queued_rayjob(deployment), {}, "t1", 1)
        assert update["phase"] == "Queued", (deployment, update)
        assert update["reason"] == "WaitingForKueue"
        assert "Kueue" in update["message"] and "'team-ml'" in update["message"]
        assert "startTime" not in update  # KubeRay's startTime of a held RayJob is not a run
        assert {c["type"]: c["status"] for c in update["conditions"]}["Running"] == "False"
    # Admitted: Kueue sets spec.suspend false; KubeRay starts it. The queue's reason and message are cleared.
    queued = status_from_rayjob(queued_rayjob("Suspended"), {}, "t1", 1)
    admitted = status_from_rayjob(queued_rayjob("Initializing", suspend=False), queued, "t2", 1)
    assert admitted["phase"] == "Pending" and admitted["reason"] is None and admitted["message"] is None
    running = status_from_rayjob(queued_rayjob("Running", "RUNNING", suspend=False), {**queued, **admitted}, "t3", 1)
    assert running["phase"] == "Running" and running["startTime"] == "2026-01-01T00:00:00Z"
    # Evicted by Kueue (preempted): suspended again, queued again.
    evicted = status_from_rayjob(queued_rayjob("Suspending", "RUNNING"), running, "t4", 1)
    assert evicted["phase"] == "Queued"


def test_a_suspended_rayjob_without_a_queue_stays_suspended() -> None:
    body = queued_rayjob("Suspended")
    body["metadata"]["labels"] = {}
    assert status_from_rayjob(body, {}, "t1", 1)["phase"] == "Suspended"
