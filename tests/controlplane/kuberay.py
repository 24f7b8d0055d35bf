"""KubeRay's operator in the cluster, as users install it: a Deployment in `kuberay-system` running an image made
of the `ray-operator` binary built here, with the ServiceAccount, ClusterRole and bindings from the ray-operator
module's own `config/` (its manager Deployment too, with only the image and the namespace set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.controlplane import gomod

NAMESPACE = "kuberay-system"
DEPLOYMENT = "kuberay-operator"
CONFIG_FILES = (
    "rbac/service_account.yaml",
    "rbac/role.yaml",
    "rbac/role_binding.yaml",
    "rbac/leader_election_role.yaml",
    "rbac/leader_election_role_binding.yaml",
    "manager/manager.yaml",
)


def version() -> str:
    """KUBERAY_VERSION from versions.env (what build.sh built)."""
    return gomod.pinned("KUBERAY_VERSION")


def image_ref() -> str:
    return f"kuberay-operator:{version()}"


def image_content(bin_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """The image: the static `ray-operator` binary as /manager (the Deployment's command), a non-root user."""
    return {"/manager": bin_dir / "ray-operator"}, ["--config.entrypoint", "/manager", "--config.user", "65532"]


def module_config() -> Path:
    """The ray-operator module's `config/` (go mod download: the module cache, fetched if missing)."""
    return gomod.module_dir(f"github.com/ray-project/kuberay/ray-operator@{version()}") / "config"


def manifests(config: Path, image: str) -> list[dict[str, Any]]:
    """The module's RBAC and manager Deployment in NAMESPACE, running `image` (imported, never pulled)."""
    documents: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    for name in CONFIG_FILES:
        for doc in yaml.safe_load_all((config / name).read_text()):
            if not doc:
                continue
            if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                doc["metadata"]["namespace"] = NAMESPACE
            for subject in doc.get("subjects", []):
                subject["namespace"] = NAMESPACE
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                container["image"], container["imagePullPolicy"] = image, "Never"
            documents.append(doc)
    return documents
