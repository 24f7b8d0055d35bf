"""pytest fixtures on the real control plane: the cluster (session), the operator as the chart runs it
(its own process, the chart's ServiceAccount and ClusterRole), fresh namespaces, and API helpers.

Every client here is built from an explicit kubeconfig, never the process-wide default, so these tests and
the emulator's fault-injection tests never share client state.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, utils
from kubernetes.client.rest import ApiException

from batchinfer_job import spec as s
from tests.controlplane.cluster import REPO, ControlPlane, start, stop, write_kubeconfig
from tests.helpers import eventually

OPERATOR_NAMESPACE = "batchinfer-system"
RESYNC_SECONDS = 5
OPERATOR_RBAC = REPO / "manifests" / "rbac" / "operator-rbac.yaml"


class Cluster:
    """API helpers over one identity (admin by default)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.extensions = client.ApiextensionsV1Api(api)

    def create_bi(self, namespace: str, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(
            s.API_GROUP,
            s.API_VERSION,
            namespace,
            s.PLURAL,
            {**body, "metadata": {**body.get("metadata", {}), "namespace": namespace}},
            dry_run="All" if dry_run else None,
            field_validation="Strict",  # what kubectl sends: unknown fields are errors, not silently pruned
        )

    def get_bi(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, name)

    def patch_bi(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, name, patch)

    def delete_bi(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(s.API_GROUP, s.API_VERSION, namespace, s.PLURAL, name)

    def ray(self, namespace: str, plural: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object("ray.io", "v1", namespace, plural)["items"]

    def pods(self, namespace: str) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(namespace).items


def impersonating(plane: ControlPlane, user: str, groups: list[str] | None = None) -> Cluster:
    """A Cluster acting as `user` (admin impersonates it: the API server authorizes the impersonated user)."""
    api = config.new_client_from_config(str(plane.kubeconfig))
    api.set_default_header("Impersonate-User", user)
    for group in groups or []:
        api.set_default_header("Impersonate-Group", group)
    return Cluster(api)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager + KubeRay on 127.0.0.1, with our and KubeRay's CRDs."""
    folder = REPO / "build" / "k8s-test"
    plane = start(folder)
    yield plane
    stop(folder)


@pytest.fixture(scope="session")
def cluster(control_plane: ControlPlane) -> Cluster:
    return Cluster(config.new_client_from_config(str(control_plane.kubeconfig)))


@pytest.fixture
def cluster_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    eventually(lambda: _has_default_service_account(cluster, name), 30, "the namespace's default ServiceAccount")
    yield name
    cluster.core.delete_namespace(name)


def _has_default_service_account(cluster: Cluster, namespace: str) -> bool:
    try:
        cluster.core.read_namespaced_service_account("default", namespace)
    except ApiException:
        return False
    return True


def create_all(cluster: Cluster, manifest: Path) -> None:
    """Create every object of a YAML file; those that exist already are kept (the session shares them)."""
    documents = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    try:
        utils.create_from_yaml(cluster.api, yaml_objects=documents)
    except utils.FailToCreateError as err:
        if any(e.status != 409 for e in err.api_exceptions):
            raise


def operator_credentials(plane: ControlPlane, cluster: Cluster) -> Path:
    """The chart's ServiceAccount, ClusterRole and binding (as `make manifests` renders them), and a kubeconfig
    holding a token of that ServiceAccount: the operator runs with exactly the chart's permissions."""
    try:
        cluster.core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    except ApiException as err:
        if err.status != 409:
            raise
    create_all(cluster, OPERATOR_RBAC)
    token = cluster.core.create_namespaced_service_account_token(
        "batchinfer", OPERATOR_NAMESPACE, {"spec": {"expirationSeconds": 24 * 3600}}
    ).status.token
    path = plane.folder / "operator.kubeconfig"
    write_kubeconfig(path, plane.url, plane.ca, {"token": token}, user="batchinfer-operator")
    return path


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane: ControlPlane, cluster: Cluster) -> Path:
    return operator_credentials(control_plane, cluster)


class OperatorProcess:
    """`kopf run` as the chart's Deployment runs it, in its own process; its log is kept for assertions."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.kubeconfig, self.log = kubeconfig, log
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINFER_")}
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["BATCHINFER_RESYNC_SECONDS"] = str(RESYNC_SECONDS)  # deadlines are checked on the resync timer
        kopf = Path(sys.executable).parent / "kopf"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(kopf), "run", "--standalone", "--all-namespaces", "-m", "batchinfer_operator.main"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        eventually(lambda: "Initial authentication has finished" in self.log.read_text(), 60, "the operator's login")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def real_operator(control_plane: ControlPlane, operator_kubeconfig: Path) -> Iterator[OperatorProcess]:
    log = control_plane.folder / f"operator-{uuid.uuid4().hex[:6]}.log"
    operator = OperatorProcess(operator_kubeconfig, log)
    yield operator
    operator.stop()
