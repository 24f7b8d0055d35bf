"""Fixtures for operator tests: the strict emulator, a kubeconfig pointing at it, the real kopf operator,
and a stand-in for the KubeRay controller that moves RayJob status."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes
import pytest
import yaml
from kopf.testing import KopfRunner

from batchinfer_job import spec as s
from tests.crd_schemas import KUBERAY, version_schema
from tests.k8s_emulator import EmulatorThread, StrictEmulator

VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def declare(emulator: StrictEmulator) -> None:
    """Discovery for what kopf and the operator touch (kopf silently never watches without the first three)."""
    from batchinfer_operator.crd import crd_manifest

    def add(group: str, version: str, plural: str, kind: str, namespaced: bool = True, status: bool = False) -> None:
        emulator.resources[kmock.resource(group, version, plural)] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=VERBS, subresources={"status"} if status else set()
        )

    add("", "v1", "namespaces", "Namespace", namespaced=False)
    add("", "v1", "events", "Event")
    add("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", namespaced=False)
    add("", "v1", "configmaps", "ConfigMap")
    add("", "v1", "serviceaccounts", "ServiceAccount")
    add("", "v1", "pods", "Pod")
    add("rbac.authorization.k8s.io", "v1", "roles", "Role")
    add("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
    add(s.API_GROUP, s.API_VERSION, s.PLURAL, s.KIND, status=True)
    add(s.API_GROUP, s.API_VERSION, "batchinferenceclasses", "BatchInferenceClass", namespaced=False)
    add("ray.io", "v1", "rayjobs", "RayJob", status=True)
    emulator.schemas[s.PLURAL] = version_schema(crd_manifest(), s.API_VERSION)
    rayjobs = yaml.load((KUBERAY / "ray.io_rayjobs.yaml").read_text(), Loader=yaml.CSafeLoader)
    emulator.schemas["rayjobs"] = version_schema(rayjobs, "v1")
    emulator.status_subresource |= {s.PLURAL, "rayjobs"}


@pytest.fixture(scope="session")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    """The emulator on 127.0.0.1, with the kubernetes client and $KUBECONFIG pointing at it."""
    server = EmulatorThread(declare).start()
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": server.url}}],
                "users": [{"name": "tester", "user": {"token": "test-token"}}],
                "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
                "current-context": "emulator",
            }
        )
    )
    patcher = pytest.MonkeyPatch()
    patcher.setenv("KUBECONFIG", str(kubeconfig))
    # The client reads $KUBECONFIG at import time; point its default at ours too.
    patcher.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    kubernetes.config.load_kube_config(config_file=str(kubeconfig))
    yield server
    patcher.undo()
    server.stop()


@pytest.fixture
def namespace(k8s: EmulatorThread) -> str:
    """A fresh namespace name per test (namespaced objects need no Namespace object in the emulator)."""
    return f"t-{uuid.uuid4().hex[:8]}"


def start_operator(*extra: str) -> KopfRunner:
    runner = KopfRunner(
        ["run", "--standalone", "--all-namespaces", "-m", "batchinfer_operator.main", *extra],
        timeout=60,
    )
    runner.__enter__()
    return runner


class OperatorControl:
    """The real kopf operator running in a thread; `restart()` stops it and starts a fresh process state."""

    def __init__(self) -> None:
        self.runner = start_operator()

    def restart(self) -> None:
        stop_operator(self.runner)
        self.runner = start_operator()

    def stop(self) -> None:
        stop_operator(self.runner)


@pytest.fixture
def operator(k8s: EmulatorThread, namespace: str) -> Iterator[OperatorControl]:
    """The operator for one test; its namespace's objects are forgotten afterwards (see forget_namespace)."""
    control = OperatorControl()
    yield control
    control.stop()
    k8s.forget_namespace(namespace)


def stop_operator(runner: KopfRunner) -> None:
    runner.__exit__(None, None, None)
    assert runner.exit_code == 0, runner.output


class Api:
    """Thin helpers over the kubernetes client for the objects the tests handle."""

    def __init__(self) -> None:
        self.custom = kubernetes.client.CustomObjectsApi()
        self.core = kubernetes.client.CoreV1Api()

    def create_bi(self, namespace: str, name: str, spec: Any, status: Any = None) -> dict[str, Any]:
        """Create a BatchInference; `spec` may be anything (the emulator decides whether to admit it)."""
        body = {
            "apiVersion": f"{s.API_GROUP}/{s.API_VERSION}",
            "kind": s.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
            **({"status": status} if status is not None else {}),
        }
        return self.custom.create_namespaced_custom_object(s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, body)

    def get_bi(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, name)

    def patch_bi(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, name, patch)

    def delete_bi(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, name)

    def rayjobs(self, namespace: str) -> list[dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs")["items"]
        return [i for i in items if i["metadata"].get("namespace") == namespace]  # the emulator ignores selectors

    def configmaps(self, namespace: str) -> list[Any]:
        return [c for c in self.core.list_namespaced_config_map(namespace).items if c.metadata.namespace == namespace]

    def events(self, namespace: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.metadata.namespace == namespace]


class FakeKubeRay:
    """Moves a RayJob's status the way the KubeRay controller does (status subresource only)."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self.api = kubernetes.client.CustomObjectsApi()

    def _status(self, **status: Any) -> None:
        self.api.patch_namespaced_custom_object_status(
            "ray.io", "v1", self.namespace, "rayjobs", self.name, {"status": status}
        )

    def admit(self) -> None:
        """What Kueue does to admit a queued RayJob: unsuspend it (the spec, not the status)."""
        self.api.patch_namespaced_custom_object("ray.io", "v1", self.namespace, "rayjobs", self.name,
                                                {"spec": {"suspend": False}})  # fmt: skip

    def initializing(self) -> None:
        self._status(
            jobDeploymentStatus="Initializing",
            jobStatus="",
            rayClusterName=f"{self.name}-raycluster-x7k2q",
            jobId=f"{self.name}-abcde",
        )

    def running(self) -> None:
        self._status(
            jobDeploymentStatus="Running",
            jobStatus="RUNNING",
            startTime="2026-11-25T10:00:00Z",
            dashboardURL=f"{self.name}-raycluster-x7k2q-head-svc.{self.namespace}.svc.cluster.local:8265",
        )

    def complete_lagging(self) -> None:
        """Deployment says Complete before jobStatus catches up (kuberay#2314)."""
        self._status(jobDeploymentStatus="Complete", jobStatus="RUNNING")

    def succeed(self) -> None:
        self._status(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", endTime="2026-11-25T10:30:00Z")

    def fail(self, reason: str, message: str) -> None:
        self._status(
            jobDeploymentStatus="Failed",
            jobStatus="FAILED",
            reason=reason,
            message=message,
            endTime="2026-11-25T10:05:00Z",
        )


def read_configmap_spec(api: Api, namespace: str) -> dict[str, Any]:
    import json

    (cm,) = api.configmaps(namespace)
    return json.loads(cm.data["spec.json"])


def quickstart_spec() -> dict[str, Any]:
    return yaml.safe_load(Path("manifests/samples/quickstart.yaml").read_text())["spec"]
