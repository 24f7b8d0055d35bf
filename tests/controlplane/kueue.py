"""Kueue in the cluster, as its own `config/default` installs it: `kubectl kustomize` of the kueue module's
`config/` (what Kueue's `make deploy` applies), in `kueue-system`, running an image made of the `kueue` binary
built here. What differs from that install, and why:

- its servers use certificates from the run's CA (`internalCertManagement` off, as Kueue documents for
  certificates managed outside it): the webhooks' (admission and CRD conversion; every `caBundle` is that CA)
  in the Secret Kueue mounts, and the metrics and visibility servers' in the Secrets and mounts its
  cert-manager variant adds (`cert_metrics_manager_patch.yaml`, `cert_visibility_manager_patch.yaml`);
- the visibility APIService is left out: this API server runs no aggregation layer (no front-proxy
  certificates), and an unavailable aggregated API stalls namespace deletion cluster-wide;
- the manager asks for 100m CPU instead of 500m: the node has two CPUs and a demo job takes 1.6 of them.

Everything else — CRDs, RBAC, the manager's configuration with `ray.io/rayjob` among its integrations,
`manageJobsWithoutQueueName: false` (only jobs with the queue label are Kueue's) — is Kueue's own.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane import gomod, pki
from tests.controlplane.host import NodeError, kubectl_binary

NAMESPACE = "kueue-system"
DEPLOYMENT = "kueue-controller-manager"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
CONFIG_MAP = "kueue-manager-config"
CONFIG_KEY = "controller_manager_config.yaml"
MANAGER_CPU = "100m"


def version() -> str:
    """KUEUE_VERSION from versions.env (what `build.sh kueue` built)."""
    return gomod.pinned("KUEUE_VERSION")


def image_ref() -> str:
    return f"kueue:{version()}"


def image_content(kueue_bin: Path) -> tuple[dict[str, Path], list[str]]:
    """The image: the static `kueue` binary as /manager (the Deployment's command), a non-root user."""
    return {"/manager": kueue_bin}, ["--config.entrypoint", "/manager", "--config.user", "65532"]


def module_dir() -> Path:
    """The kueue module's folder in Go's module cache (go mod download: fetched if missing)."""
    return gomod.module_dir(f"sigs.k8s.io/kueue@{version()}")


def kustomized(module: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize config/default` of the module: Kueue's install manifests."""
    got = subprocess.run(
        [kubectl_binary(), "kustomize", str(module / "config" / "default")], capture_output=True, text=True, check=False
    )
    if got.returncode != 0:
        raise NodeError(f"kubectl kustomize of Kueue's config/default failed: {got.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(got.stdout) if doc]


# Secret → (the Service its certificate is for, where the manager reads it): Kueue's names.
SERVING_SECRETS = {
    WEBHOOK_SECRET: (WEBHOOK_SERVICE, "/tmp/k8s-webhook-server/serving-certs"),
    "kueue-metrics-server-cert": ("kueue-controller-manager-metrics-service", "/etc/kueue/metrics/certs"),
    "kueue-visibility-server-cert": ("kueue-visibility-server", "/visibility"),
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def serving_secret(keys: pki.Pki, secret: str, service: str) -> dict[str, Any]:
    """A TLS Secret for `service` in NAMESPACE, signed by the run's CA."""
    host = f"{service}.{NAMESPACE}.svc"
    cert, key = pki.issue(keys, secret, host, dns=(host, f"{host}.cluster.local"))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/name": "kueue"}},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": _b64(cert.read_bytes()),
            "tls.key": _b64(key.read_bytes()),
            "ca.crt": _b64(keys.ca_cert.read_bytes()),
        },
    }


def mount_certificates(pod: dict[str, Any]) -> None:
    """Mount every serving Secret where the manager reads it (replacing what the default install mounts there)."""
    container = pod["containers"][0]
    paths = {path for _, path in SERVING_SECRETS.values()}
    replaced = {m["name"] for m in container["volumeMounts"] if m["mountPath"] in paths}
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] not in replaced]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] not in replaced]
    for secret, (_, path) in SERVING_SECRETS.items():
        container["volumeMounts"].append({"name": secret, "mountPath": path, "readOnly": True})
        pod["volumes"].append({"name": secret, "secret": {"secretName": secret}})


def manifests(documents: list[dict[str, Any]], image: str, keys: pki.Pki) -> list[dict[str, Any]]:
    """Kueue's install manifests with the image, the run's certificates and the node's CPU (module docstring)."""
    ca = keys.ca_cert.read_bytes()
    out = []
    for doc in documents:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "APIService" or (kind == "Secret" and name in SERVING_SECRETS):
            continue
        if kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            for webhook in doc["webhooks"]:
                webhook["clientConfig"]["caBundle"] = _b64(ca)
        elif kind == "CustomResourceDefinition" and doc["spec"].get("conversion", {}).get("strategy") == "Webhook":
            doc["spec"]["conversion"]["webhook"]["clientConfig"]["caBundle"] = _b64(ca)
        elif kind == "ConfigMap" and name == CONFIG_MAP:
            config = yaml.safe_load(doc["data"][CONFIG_KEY])
            config["internalCertManagement"] = {"enable": False}
            doc["data"][CONFIG_KEY] = yaml.safe_dump(config)
        elif kind == "Deployment" and name == DEPLOYMENT:
            container = doc["spec"]["template"]["spec"]["containers"][0]
            container["image"], container["imagePullPolicy"] = image, "Never"
            container["resources"]["requests"]["cpu"] = MANAGER_CPU
            mount_certificates(doc["spec"]["template"]["spec"])
        out.append(doc)
        if kind == "Namespace":  # the Secrets go in it, before the Deployment that mounts them
            out += [serving_secret(keys, secret, service) for secret, (service, _) in SERVING_SECRETS.items()]
    return out
