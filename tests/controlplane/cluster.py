"""A real Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, KubeRay (a process here); and,
with a node (`node.py`), pods that run, KubeRay and Kueue as Deployments (`kuberay.py`, `kueue.py`) and an S3
API the pods reach (`object_store.py`).

Built from the Go module proxy by `build.sh` (pinned in `versions.env`), started on random free ports with
certificates generated per run; logs, certificates and the admin kubeconfig live in one folder
(`build/k8s` for `make k8s-up`). Without a node (no root needed) pods stay Pending, which is enough to see
the pod specs KubeRay creates and how status is mirrored. `make k8s-up`/`make k8s-down` and the pytest
fixtures all use `start`/`stop` here.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from tests.controlplane import kuberay, kueue, node, object_store, pki
from tests.controlplane.processes import (
    LOOPBACK,
    ControlPlaneError,
    free_port,
    https_ok,
    spawn,
    terminate,
    wait_ready,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENDORED_KUBERAY = REPO / "manifests" / "kuberay"
OUR_CRDS = REPO / "manifests" / "crds"
STATE_FILE = "state.json"
IMAGES = REPO / "build" / "images"  # the project's images as OCI archives (make k8s-images)


@dataclass
class ControlPlane:
    """A running control plane: where it is, how to reach it, and its processes."""

    folder: Path
    url: str
    kubeconfig: Path
    pids: dict[str, int]
    binaries: str
    node: dict[str, int] = field(default_factory=dict)  # the node's processes (empty: control plane only)

    def save(self) -> None:
        state = {**asdict(self), "folder": str(self.folder), "kubeconfig": str(self.kubeconfig)}
        (self.folder / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, folder: Path) -> ControlPlane:
        state = json.loads((folder / STATE_FILE).read_text())
        return cls(
            Path(state["folder"]),
            state["url"],
            Path(state["kubeconfig"]),
            state["pids"],
            state["binaries"],
            state.get("node", {}),
        )

    def client_cert(self, name: str) -> tuple[str, str]:
        return str(self.folder / "pki" / f"{name}.crt"), str(self.folder / "pki" / f"{name}.key")

    @property
    def ca(self) -> str:
        return str(self.folder / "pki" / "ca.crt")


def binaries(which: str = "control-plane") -> Path:
    """The folder holding the control plane's four binaries ($KUBEBUILDER_ASSETS when complete) or, for
    `node` and `kueue`, theirs; built on first use into the per-machine cache (minutes on two cores)."""
    argv = ["bash", str(HERE / "build.sh"), *([which] if which in ("node", "kueue") else [])]
    result = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise ControlPlaneError(f"building the control plane failed (exit {result.returncode}); see the lines above")
    return Path(result.stdout.strip().splitlines()[-1])


def write_kubeconfig(path: Path, url: str, ca: str, credentials: dict[str, str], user: str = "admin") -> None:
    """A kubeconfig for one user: `credentials` is client-certificate/client-key or token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "batchinfer-test", "cluster": {"server": url, "certificate-authority": ca}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "batchinfer-test", "context": {"cluster": "batchinfer-test", "user": user}}],
        "current-context": "batchinfer-test",
    }
    path.write_text(yaml.safe_dump(config))


# What the node needs beyond the control plane's own controllers (`node.py`).
NODE_CONTROLLERS = (
    "nodelifecycle,taint-eviction-controller,endpointslice,endpointslicemirroring,root-ca-cert-publisher,"
    "replicaset,deployment,daemonset,podgc,ttl,ttl-after-finished"
)


def start(folder: Path, timeout: float = 180, with_node: bool = False) -> ControlPlane:
    """Start every component (building binaries first if needed) and install the CRDs; returns when ready.

    `with_node`: also a node (`node.py`; root): the API server then listens on the pod network's gateway, where
    pods reach it through the `kubernetes` Service, and Services come from 198.19.0.0/16; an S3 API listens
    there too (`object_store`), and `env` in the folder holds the shell lines that reach both.
    """
    bin_dir = binaries()
    if with_node:
        node.check_host()
        node_bins = binaries("node")
    if folder.exists():
        stop(folder)
        shutil.rmtree(folder)  # a fresh etcd, certificates and logs every run
    folder.mkdir(parents=True)
    host = node.GATEWAY if with_node else LOOPBACK
    server_ips = (LOOPBACK, node.GATEWAY, node.KUBERNETES_SERVICE_IP) if with_node else (LOOPBACK,)
    keys = pki.generate(folder / "pki", {"admin": ("admin", "system:masters")}, server_ips=server_ips)
    processes: dict[str, subprocess.Popen] = {}
    if with_node:
        images = node.node_images(Path(node_bins) / "images", Path(node_bins))
        images.update(node.project_images(IMAGES))
        files, image_config = kuberay.image_content(bin_dir)
        name, tag = kuberay.image_ref().split(":")
        images[kuberay.image_ref()] = node.oci_image(Path(node_bins) / "images", name, tag, files, image_config)
        kueue_bin = binaries("kueue") / "kueue"
        files, image_config = kueue.image_content(kueue_bin)
        name, tag = kueue.image_ref().split(":")
        images[kueue.image_ref()] = node.oci_image(kueue_bin.parent, name, tag, files, image_config)
        (folder / "node-binaries").write_text(str(node_bins))
        node.network_up(folder)
    try:
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://{LOOPBACK}:{etcd_port}"
        processes["etcd"] = spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={folder / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://{LOOPBACK}:{peer_port}",
                f"--initial-advertise-peer-urls=http://{LOOPBACK}:{peer_port}",
                f"--initial-cluster=default=http://{LOOPBACK}:{peer_port}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            folder,
        )
        wait_ready("etcd", processes["etcd"], folder, lambda: https_ok(f"{etcd_url}/health"), timeout)

        url = f"https://{host}:{api_port}"
        node_flags = [
            f"--service-cluster-ip-range={node.SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
            f"--kubelet-client-certificate={keys.path('admin.crt')}",
            f"--kubelet-client-key={keys.path('admin.key')}",
            f"--kubelet-certificate-authority={keys.ca_cert}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
        plain_flags = [
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
        ]
        processes["kube-apiserver"] = spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={host}",
                f"--advertise-address={host}",
                f"--secure-port={api_port}",
                f"--cert-dir={folder / 'apiserver-certs'}",
                f"--tls-cert-file={keys.path('apiserver.crt')}",
                f"--tls-private-key-file={keys.path('apiserver.key')}",
                f"--client-ca-file={keys.ca_cert}",
                f"--service-account-issuer={url}",
                f"--service-account-key-file={keys.path('sa.pub')}",
                f"--service-account-signing-key-file={keys.path('sa.key')}",
                *(node_flags if with_node else plain_flags),
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
            folder,
        )
        context = ssl.create_default_context(cafile=str(keys.ca_cert))
        context.load_cert_chain(str(keys.path("admin.crt")), str(keys.path("admin.key")))
        wait_ready(
            "kube-apiserver", processes["kube-apiserver"], folder, lambda: https_ok(f"{url}/readyz", context), timeout
        )
        kubeconfig = folder / "kubeconfig"
        admin = {"client-certificate": str(keys.path("admin.crt")), "client-key": str(keys.path("admin.key"))}
        write_kubeconfig(kubeconfig, url, str(keys.ca_cert), admin)

        kcm_port = free_port()
        processes["kube-controller-manager"] = spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token,job,clusterrole-aggregation"
                + (f",{NODE_CONTROLLERS}" if with_node else ""),
                f"--service-account-private-key-file={keys.path('sa.key')}",
                f"--root-ca-file={keys.ca_cert}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={kcm_port}",
                f"--cert-dir={folder / 'kcm-certs'}",
                "--leader-elect=false",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
            folder,
        )
        wait_ready(
            "kube-controller-manager",
            processes["kube-controller-manager"],
            folder,
            lambda: https_ok(f"https://{LOOPBACK}:{kcm_port}/healthz", ssl._create_unverified_context()),
            timeout,
        )
        install_crds(kubeconfig, [*sorted(OUR_CRDS.glob("*.yaml")), *sorted(VENDORED_KUBERAY.glob("ray.io_*.yaml"))])

        node_pids: dict[str, int] = {}
        if with_node:
            processes["s3"] = object_store.start(folder, timeout)
            object_store.write_env(folder, kubeconfig)
            node_pids = node.start(folder, url, keys, kubeconfig, Path(node_bins), images, timeout)
            try:  # KubeRay as users run it: a Deployment
                kuberay_image = f"{node.IMAGE_PREFIX}/{kuberay.image_ref()}"
                documents = kuberay.manifests(kuberay.module_config(), kuberay_image)
                node.deploy(kubeconfig, documents, kuberay.NAMESPACE, kuberay.DEPLOYMENT, timeout)
                start_kueue(kubeconfig, keys, timeout)
            except BaseException:
                node.stop(folder, node_pids, kubeconfig)
                raise
        else:
            processes["ray-operator"] = start_kuberay_process(bin_dir, folder, kubeconfig, timeout)
    except BaseException:
        terminate({name: p.pid for name, p in processes.items()})
        if with_node:
            node.network_down(folder)
        raise
    pids = {name: p.pid for name, p in processes.items()}
    plane = ControlPlane(folder, url, kubeconfig, pids, str(bin_dir), node_pids)
    plane.save()
    return plane


def start_kueue(kubeconfig: Path, keys: pki.Pki, timeout: float) -> None:
    """Kueue as its config/default installs it (`kueue.py`), ready once its webhooks answer the API server."""
    image = f"{node.IMAGE_PREFIX}/{kueue.image_ref()}"
    documents = kueue.manifests(kueue.kustomized(kueue.module_dir()), image, keys)
    node.deploy(kubeconfig, documents, kueue.NAMESPACE, kueue.DEPLOYMENT, timeout, server_side=True)
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    api = client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))
    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "probe"}}
    deadline = time.monotonic() + timeout
    while True:  # a dry-run create passes Kueue's mutating and validating webhooks: they are reached
        try:
            api.create_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "resourceflavors", flavor, dry_run="All")
            return
        except ApiException as err:
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"Kueue's webhooks did not answer in {timeout:.0f} s: {err.body}") from None
            time.sleep(1)


def start_kuberay_process(bin_dir: Path, folder: Path, kubeconfig: Path, timeout: float) -> subprocess.Popen:
    """KubeRay's operator as a process here, for the control plane without a node."""
    probe_port = free_port()
    process = spawn(
        "ray-operator",
        [
            str(bin_dir / "ray-operator"),
            "--metrics-addr=0",
            f"--health-probe-bind-address={LOOPBACK}:{probe_port}",
            "--enable-leader-election=false",
            "--log-stdout-encoder=console",
        ],
        folder,
        env={"KUBECONFIG": str(kubeconfig)},
    )
    wait_ready("ray-operator", process, folder, lambda: https_ok(f"http://{LOOPBACK}:{probe_port}/readyz"), timeout)
    return process


def install_crds(kubeconfig: Path, files: list[Path], timeout: float = 60) -> None:
    """Create (or replace) CRDs from YAML files and wait until each is Established."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    api = client.ApiextensionsV1Api(config.new_client_from_config(str(kubeconfig)))
    names = []
    for path in files:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            names.append(crd["metadata"]["name"])
            try:
                api.create_custom_resource_definition(crd)
            except ApiException as err:
                if err.status != 409:
                    raise ControlPlaneError(f"the API server refused the CRD in {path}: {err.body}") from None
                current = api.read_custom_resource_definition(crd["metadata"]["name"])
                crd["metadata"]["resourceVersion"] = current.metadata.resource_version
                api.replace_custom_resource_definition(crd["metadata"]["name"], crd)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            conditions = api.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {name} not Established after {timeout:.0f} s")
            time.sleep(0.2)


def stop(folder: Path) -> list[str]:
    """Stop the control plane whose state is in `folder`; returns the names it stopped."""
    if not (folder / STATE_FILE).exists():
        return []
    plane = ControlPlane.load(folder)
    if plane.node:
        node.stop(folder, plane.node, plane.kubeconfig)
    terminate(plane.pids)
    (folder / STATE_FILE).unlink()
    if plane.node:
        node.network_down(folder)
        left = node.leftovers(folder, [*plane.pids.values(), *plane.node.values()])
        if left:
            raise ControlPlaneError(f"the node left {len(left)} things on this machine: {'; '.join(left)}")
    return list(plane.pids) + list(plane.node)
