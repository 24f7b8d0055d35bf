"""Why a job's pods do not run, in the kubelet's and the scheduler's words (pod status as the API returns it)."""

from __future__ import annotations

from typing import Any

from batchinfer_operator.pod_problems import pod_problem


def pod(name: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Pending", **status}}


def waiting(container: str, reason: str, message: str) -> dict[str, Any]:
    return {"name": container, "ready": False, "state": {"waiting": {"reason": reason, "message": message}}}


UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available: "
    "1 No preemption victims found for incoming pod.",
}


def test_an_image_that_cannot_be_pulled_is_named_with_the_kubelets_message() -> None:
    pulling = waiting("ray-head", "ImagePullBackOff", 'Back-off pulling image "registry.example/job:0.1"')
    found = pod_problem([pod("bi-head-x", containerStatuses=[pulling])])
    assert found is not None and found.reason == "ImagePullBackOff"
    assert found.message == (
        'pod bi-head-x, container ray-head: ImagePullBackOff: Back-off pulling image "registry.example/job:0.1"'
    )


def test_a_missing_secret_and_an_unschedulable_gpu_pod_stuck_containers_first() -> None:
    config = waiting("ray-worker", "CreateContainerConfigError", 'secret "s3-credentials" not found')
    pods = [pod("a-gpu-worker", conditions=[UNSCHEDULABLE]), pod("b-head", containerStatuses=[config])]
    found = pod_problem(pods)
    assert found is not None and found.reason == "CreateContainerConfigError"
    assert 'secret "s3-credentials" not found' in found.message
    only_gpu = pod_problem(pods[:1])
    assert only_gpu is not None and only_gpu.reason == "Unschedulable"
    assert only_gpu.message.startswith("pod a-gpu-worker: Unschedulable: 0/1 nodes are available: 1 Insufficient")


def test_pods_that_start_normally_are_no_problem() -> None:
    creating = waiting("ray-head", "ContainerCreating", "")
    scheduled = {"type": "PodScheduled", "status": "True"}
    assert pod_problem([pod("h", containerStatuses=[creating], conditions=[scheduled]), pod("w")]) is None
    assert pod_problem([]) is None
