"""The real kopf operator against the emulator, for what a real API server with a node-less KubeRay cannot
show: RayJobs that succeed or fail (FakeKubeRay moves their status), progress while Running, the operator's
own refusal where CEL is not enforced. Children, admission, RBAC, GC and restarts run on the real control
plane (test_cluster_*.py)."""

from __future__ import annotations

import time

import kubernetes
import pytest

from batchinfer_job import spec as s
from batchinfer_job.progress import ProgressReport
from batchinfer_job.status_reporter import StatusReporter
from tests.helpers import eventually
from tests.operator_env import (
    Api,
    FakeKubeRay,
    quickstart_spec,
    read_configmap_spec,
)

NAME = "quickstart"


@pytest.fixture
def api(k8s) -> Api:
    return Api()


def one_rayjob(api: Api, namespace: str) -> dict:
    jobs = api.rayjobs(namespace)
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    return jobs[0]


def status_of(api: Api, namespace: str, name: str = NAME) -> dict:
    """The BatchInference's status; empty until the operator first writes it."""
    return api.get_bi(namespace, name).get("status") or {}


def phase(api: Api, namespace: str, name: str = NAME) -> str | None:
    return status_of(api, namespace, name).get("phase")


def started(api: Api, namespace: str, spec: dict | None = None, name: str = NAME) -> FakeKubeRay:
    api.create_bi(namespace, name, spec or quickstart_spec())
    rayjob = eventually(lambda: one_rayjob(api, namespace), what="the RayJob")
    return FakeKubeRay(namespace, rayjob["metadata"]["name"])


def test_success_is_mirrored_with_conditions_and_times(operator, api: Api, namespace: str) -> None:
    kuberay = started(api, namespace)
    kuberay.initializing()
    eventually(lambda: status_of(api, namespace).get("rayClusterName"), what="rayClusterName")
    kuberay.running()
    eventually(lambda: phase(api, namespace) == "Running", what="Running")
    kuberay.complete_lagging()
    status = eventually(lambda: status_of(api, namespace), what="status")
    assert status["phase"] == "Running"  # jobStatus lags: no success claimed yet
    kuberay.succeed()
    eventually(lambda: phase(api, namespace) == "Succeeded", what="Succeeded")
    status = status_of(api, namespace)
    assert status["startTime"] == "2026-11-25T10:00:00Z" and status["completionTime"] == "2026-11-25T10:30:00Z"
    assert status["rayClusterName"].startswith(status["rayJobName"]) and status["dashboardURL"].endswith(":8265")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Succeeded"]["reason"] == "JobSucceeded"
    assert conditions["Running"]["status"] == "False" and conditions["Failed"]["status"] == "False"
    eventually(lambda: "Succeeded" in {e.reason for e in api.events(namespace)}, what="a Succeeded event")


def test_failure_is_mirrored_with_reason_and_message(operator, api: Api, namespace: str) -> None:
    kuberay = started(api, namespace)
    kuberay.initializing()
    kuberay.running()
    kuberay.fail("AppFailed", "Job entrypoint command failed with exit code 1")
    eventually(lambda: phase(api, namespace) == "Failed", what="Failed")
    status = status_of(api, namespace)
    assert status["reason"] == "AppFailed"
    assert status["message"] == "Job entrypoint command failed with exit code 1"
    assert status["completionTime"] == "2026-11-25T10:05:00Z"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "AppFailed")
    warnings = eventually(lambda: [e for e in api.events(namespace) if e.reason == "Failed"], what="Failed event")
    assert warnings[0].type == "Warning" and "exit code 1" in warnings[0].message


def test_operator_restart_midway_keeps_exactly_one_rayjob(operator, api: Api, namespace: str) -> None:
    kuberay = started(api, namespace)
    kuberay.running()
    eventually(lambda: phase(api, namespace) == "Running", what="Running")
    first_uid = one_rayjob(api, namespace)["metadata"]["uid"]
    operator.restart()  # the new operator resumes the object: it must adopt, not duplicate
    kuberay.succeed()
    eventually(lambda: phase(api, namespace) == "Succeeded", what="Succeeded after restart")
    assert [j["metadata"]["uid"] for j in api.rayjobs(namespace)] == [first_uid]
    assert len(api.configmaps(namespace)) == 1


def test_progress_from_the_job_appears_in_status_while_running(operator, api: Api, namespace: str) -> None:
    kuberay = started(api, namespace)
    kuberay.running()
    eventually(lambda: phase(api, namespace) == "Running", what="Running")
    reporter = StatusReporter(namespace=namespace, name=NAME, api=kubernetes.client.CustomObjectsApi(), interval=0)
    reporter(ProgressReport(processed=120, failed=3, total=300, seconds=10.0))
    progress = eventually(lambda: status_of(api, namespace).get("progress"), what="progress")
    assert (progress["processed"], progress["failed"], progress["total"]) == (120, 3, 300)
    assert progress["rowsPerSecond"] == 12.0 and progress["eta"] == "15s" and progress["display"] == "120/300 (40%)"
    kuberay.succeed()
    eventually(lambda: phase(api, namespace) == "Succeeded", what="Succeeded")
    assert status_of(api, namespace)["progress"]["processed"] == 120  # the operator keeps it


def test_changing_an_immutable_field_is_refused_clearly(operator, api: Api, namespace: str) -> None:
    started(api, namespace)
    eventually(lambda: api.get_bi(namespace, NAME).get("status", {}).get("acceptedSpecHash"), what="accepted")
    api.patch_bi(namespace, NAME, {"spec": {"output": {"uri": "s3://elsewhere/out"}}})

    def rejected() -> dict | None:
        conditions = status_of(api, namespace).get("conditions") or []
        return next((c for c in conditions if c["type"] == "SpecRejected" and c["status"] == "True"), None)

    condition = eventually(rejected, what="SpecRejected")
    assert condition["reason"] == "ImmutableField"
    assert "spec.output cannot change after creation" in condition["message"]
    assert read_configmap_spec(api, namespace)["spec"]["output"]["uri"] == "build/demo/predictions"
    eventually(lambda: "SpecRejected" in {e.reason for e in api.events(namespace)}, what="SpecRejected event")


def test_suspend_may_change_and_reaches_the_rayjob(operator, api: Api, namespace: str) -> None:
    started(api, namespace)
    eventually(lambda: api.get_bi(namespace, NAME).get("status", {}).get("acceptedSpecHash"), what="accepted")
    api.patch_bi(namespace, NAME, {"spec": {"suspend": True}})
    eventually(lambda: one_rayjob(api, namespace)["spec"].get("suspend") is True, what="RayJob suspended")
    conditions = status_of(api, namespace).get("conditions") or []
    assert not any(c["type"] == "SpecRejected" and c["status"] == "True" for c in conditions)


def test_suspend_is_never_written_on_a_rayjob_kueue_admits(operator, api: Api, namespace: str) -> None:
    spec = quickstart_spec()
    spec["scheduling"] = {"queueName": "team-ml"}
    spec["suspend"] = True  # created suspended; Kueue admits it by unsuspending the RayJob
    started(api, namespace, spec)
    eventually(lambda: api.get_bi(namespace, NAME).get("status", {}).get("acceptedSpecHash"), what="accepted")
    api.patch_bi(namespace, NAME, {"spec": {"suspend": False}})
    ignored = eventually(lambda: [e for e in api.events(namespace) if e.reason == "SuspendIgnored"], what="event")
    assert "Kueue queue 'team-ml' owns this RayJob's admission" in ignored[0].message
    assert one_rayjob(api, namespace)["spec"]["suspend"] is True  # left for Kueue to change


def test_an_operator_restart_never_writes_suspended_over_a_job_kueue_admitted(
    operator, k8s, api: Api, namespace: str
) -> None:
    spec = quickstart_spec()
    spec["scheduling"] = {"queueName": "team-ml"}
    spec["suspend"] = True  # Kueue admits by unsuspending the RayJob; the BatchInference keeps suspend: true
    kuberay = started(api, namespace, spec)
    eventually(lambda: phase(api, namespace) == "Queued", what="Queued")
    kuberay.admit()
    kuberay.initializing()  # admitted: KubeRay is making its cluster
    eventually(lambda: phase(api, namespace) == "Pending", what="Pending")
    before = len(k8s.emulator.updates)
    operator.restart()

    def bi_status_writes() -> list[dict]:
        return [b["status"] for p, b in k8s.emulator.updates[before:] if p == s.PLURAL and "status" in b]

    # the resumed operator's create/resume handler writes rayJobName and outputUri again: wait for that write
    eventually(lambda: any("outputUri" in w for w in bi_status_writes()), what="the resume handler's status write")
    assert [w.get("phase") for w in bi_status_writes() if w.get("phase") == "Suspended"] == [], bi_status_writes()
    assert phase(api, namespace) == "Pending"


def test_spec_the_schema_cannot_catch_fails_with_named_field(operator, api: Api, namespace: str) -> None:
    spec = quickstart_spec()
    spec["model"] = {"packaged": "efficientnet_lite0", "torchvision": {"name": "resnet50"}}  # a CEL-only rule
    api.create_bi(namespace, NAME, spec)
    eventually(lambda: phase(api, namespace) == "Failed", what="Failed")
    status = status_of(api, namespace)
    assert status["reason"] == "SpecInvalid"
    assert "spec.model: model needs exactly one of torchvision, weightsUri, packaged, predictor" in status["message"]
    assert api.rayjobs(namespace) == []
    eventually(lambda: "SpecInvalid" in {e.reason for e in api.events(namespace)}, what="SpecInvalid event")


def test_finished_batchinference_is_not_rerun_after_its_rayjob_expires(operator, api: Api, namespace: str) -> None:
    kuberay = started(api, namespace)
    kuberay.succeed()
    eventually(lambda: phase(api, namespace) == "Succeeded", what="Succeeded")
    kubernetes.client.CustomObjectsApi().delete_namespaced_custom_object(
        "ray.io", "v1", namespace, "rayjobs", kuberay.name
    )  # ttlSecondsAfterFinished passed
    operator.restart()
    time.sleep(2)  # give the resumed operator the chance to (wrongly) recreate it
    assert api.rayjobs(namespace) == []
    assert phase(api, namespace) == "Succeeded"


def test_metrics_count_reconciles_and_phases(operator, api: Api, namespace: str) -> None:
    import socket
    import urllib.request

    from batchinfer_operator import metrics

    kuberay = started(api, namespace)
    kuberay.running()
    eventually(lambda: phase(api, namespace) == "Running", what="Running")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(port, "127.0.0.1")

    def sample(text: str, name: str) -> float:
        found = [line for line in text.splitlines() if line.startswith(name)]
        return float(found[0].split()[-1]) if found else 0.0

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    # The phase gauge follows the operator's watch stream, which may lag behind what the API already shows.
    def running_counted() -> str | None:
        text = scrape()
        return text if sample(text, 'batchinfer_batchinferences{phase="Running"}') >= 1 else None

    text = eventually(running_counted, what="the Running gauge")
    assert sample(text, 'batchinfer_reconciles_total{handler="create"}') >= 1
    assert sample(text, 'batchinfer_children_created_total{kind="RayJob"}') >= 1


def test_liveness_endpoint_answers_for_probes(k8s) -> None:
    import socket
    import urllib.request

    from tests.operator_env import start_operator, stop_operator

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = start_operator(f"--liveness=http://127.0.0.1:{port}/healthz")

    def healthz() -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return response.status
        except OSError:  # not listening yet
            return None

    try:
        assert eventually(healthz, what="the liveness endpoint") == 200
    finally:
        stop_operator(runner)


def test_a_refused_change_stays_refused_after_an_operator_restart(operator, api: Api, namespace: str) -> None:
    started(api, namespace)
    accepted = eventually(lambda: api.get_bi(namespace, NAME).get("status", {}).get("acceptedSpecHash"), what="hash")
    api.patch_bi(namespace, NAME, {"spec": {"compute": {"maxActors": 4}}})
    eventually(
        lambda: any(
            c["type"] == "SpecRejected" and c["status"] == "True"
            for c in status_of(api, namespace).get("conditions", [])
        ),
        what="SpecRejected",
    )
    operator.restart()  # resume must not adopt the refused spec as the accepted one
    time.sleep(2)
    assert status_of(api, namespace)["acceptedSpecHash"] == accepted
    assert read_configmap_spec(api, namespace)["spec"]["compute"]["maxActors"] == 1


def test_a_child_someone_else_owns_fails_the_batchinference_with_the_cause(operator, api: Api, namespace: str) -> None:
    from batchinfer_operator import metrics

    errors_before = metrics.ERRORS.labels("create")._value.get()
    api.core.create_namespaced_config_map(namespace, {"metadata": {"name": "quickstart-job"}, "data": {"x": "y"}})
    api.create_bi(namespace, NAME, quickstart_spec())
    status = eventually(
        lambda: (
            (api.get_bi(namespace, NAME).get("status") or {}).get("phase") == "Failed" and status_of(api, namespace)
        ),
        what="Failed",
    )
    assert status["reason"] == "ChildCreationFailed"
    assert "ConfigMap" in status["message"] and "not owned by this BatchInference" in status["message"]
    assert api.rayjobs(namespace) == []
    assert metrics.ERRORS.labels("create")._value.get() > errors_before  # the failing handler is counted


def test_a_status_write_lost_with_the_last_rayjob_event_is_repaired(operator, k8s, api: Api, namespace: str) -> None:
    kuberay = started(api, namespace)
    kuberay.running()
    eventually(lambda: phase(api, namespace) == "Running", what="Running")
    time.sleep(1)  # let kopf settle its own annotation patches before the fault is armed
    k8s.emulator.faults.append(("UPDATE", "batchinferences", 500))  # a PATCH is an UPDATE to kmock
    kuberay.succeed()  # the mirror's write of Succeeded meets the 500; kopf never retries event handlers
    eventually(lambda: not k8s.emulator.faults, what="the injected fault to be spent")
    eventually(lambda: phase(api, namespace) == "Succeeded", timeout=30, what="the resync to write Succeeded")


def test_the_deadline_counts_from_the_first_attempt_and_the_operator_ends_the_job(
    operator, api: Api, namespace: str
) -> None:
    spec = quickstart_spec()
    spec["activeDeadlineSeconds"] = 60
    spec["backoffLimit"] = 2
    kuberay = started(api, namespace, spec)
    kuberay.running()  # the first attempt started on 2026-11-25: far more than 60 s ago
    status = eventually(
        lambda: phase(api, namespace) == "Failed" and status_of(api, namespace),
        timeout=30,
        what="Failed by the deadline",
    )
    assert status["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=60 passed since the job first ran (2026-11-25T10:00:00Z)" in status["message"]
    eventually(lambda: api.rayjobs(namespace) == [], what="the RayJob deleted")


def test_past_the_deadline_stopped_is_written_only_once_the_rayjob_is_gone(
    operator, k8s, api: Api, namespace: str
) -> None:
    """A refused delete (403 here; a missing RBAC verb did it on real clusters) leaves the BatchInference as it
    was, and the resync timer tries again: "was stopped" is never written while the RayJob still runs."""
    spec = quickstart_spec()
    spec["activeDeadlineSeconds"] = 60
    spec["backoffLimit"] = 2
    kuberay = started(api, namespace, spec)
    k8s.emulator.faults.append(("DELETE", "rayjobs", 403))
    kuberay.running()  # the first attempt started on 2026-11-25: far more than 60 s ago
    eventually(lambda: not k8s.emulator.faults, what="the refused delete")
    status = eventually(
        lambda: phase(api, namespace) == "Failed" and status_of(api, namespace), timeout=30, what="Failed"
    )
    assert api.rayjobs(namespace) == []  # deleted before Failed was written
    assert status["message"].endswith("was stopped")
