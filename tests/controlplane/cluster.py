"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager, KubeRay.

Built from the Go module proxy by `build.sh` (pinned in `versions.env`), started on random free ports with
certificates generated per run; logs, certificates and the admin kubeconfig live in one folder
(`build/k8s` for `make k8s-up`). No kubelet and no scheduler: pods stay Pending, which is enough to see
the pod specs KubeRay creates and how status is mirrored. `make k8s-up`/`make k8s-down` and the pytest
fixture all use `start`/`stop` here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from tests.controlplane import pki

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENDORED_KUBERAY = REPO / "manifests" / "kuberay"
OUR_CRDS = REPO / "manifests" / "crds"
LOOPBACK = "127.0.0.1"
STATE_FILE = "state.json"


class ControlPlaneError(RuntimeError):
    """A component did not build, start or become ready; the message names it and its log."""


@dataclass
class ControlPlane:
    """A running control plane: where it is, how to reach it, and its processes."""

    folder: Path
    url: str
    kubeconfig: Path
    pids: dict[str, int]
    binaries: str

    def save(self) -> None:
        state = {**asdict(self), "folder": str(self.folder), "kubeconfig": str(self.kubeconfig)}
        (self.folder / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, folder: Path) -> ControlPlane:
        state = json.loads((folder / STATE_FILE).read_text())
        return cls(Path(state["folder"]), state["url"], Path(state["kubeconfig"]), state["pids"], state["binaries"])

    def client_cert(self, name: str) -> tuple[str, str]:
        return str(self.folder / "pki" / f"{name}.crt"), str(self.folder / "pki" / f"{name}.key")

    @property
    def ca(self) -> str:
        return str(self.folder / "pki" / "ca.crt")


def binaries() -> Path:
    """The folder holding the four binaries: $KUBEBUILDER_ASSETS when complete, else the build cache (built
    on first use; minutes on two cores)."""
    result = subprocess.run(["bash", str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise ControlPlaneError(f"building the control plane failed (exit {result.returncode}); see the lines above")
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _spawn(name: str, argv: list[str], folder: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = (folder / f"{name}.log").open("ab")
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=folder,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: `stop` ends it and every child
    )


def _wait(name: str, process: subprocess.Popen, folder: Path, probe, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (folder / f"{name}.log").read_text(errors="replace")[-3000:]
            raise ControlPlaneError(f"{name} exited with {process.returncode}; {folder / name}.log ends:\n{tail}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise ControlPlaneError(f"{name} not ready after {timeout:.0f} s; see {folder / name}.log")


def _https_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        return response.status == 200


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


def start(folder: Path, timeout: float = 180) -> ControlPlane:
    """Start every component (building binaries first if needed) and install the CRDs; returns when ready."""
    bin_dir = binaries()
    if folder.exists():
        stop(folder)
        shutil.rmtree(folder)  # a fresh etcd, certificates and logs every run
    folder.mkdir(parents=True)
    keys = pki.generate(folder / "pki", {"admin": ("admin", "system:masters")})
    processes: dict[str, subprocess.Popen] = {}
    try:
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://{LOOPBACK}:{etcd_port}"
        processes["etcd"] = _spawn(
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
        _wait("etcd", processes["etcd"], folder, lambda: _https_ok(f"{etcd_url}/health"), timeout)

        url = f"https://{LOOPBACK}:{api_port}"
        processes["kube-apiserver"] = _spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={api_port}",
                f"--cert-dir={folder / 'apiserver-certs'}",
                f"--tls-cert-file={keys.path('apiserver.crt')}",
                f"--tls-private-key-file={keys.path('apiserver.key')}",
                f"--client-ca-file={keys.ca_cert}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--service-account-issuer={url}",
                f"--service-account-key-file={keys.path('sa.pub')}",
                f"--service-account-signing-key-file={keys.path('sa.key')}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
            folder,
        )
        context = ssl.create_default_context(cafile=str(keys.ca_cert))
        context.load_cert_chain(str(keys.path("admin.crt")), str(keys.path("admin.key")))
        _wait(
            "kube-apiserver", processes["kube-apiserver"], folder, lambda: _https_ok(f"{url}/readyz", context), timeout
        )
        kubeconfig = folder / "kubeconfig"
        admin = {"client-certificate": str(keys.path("admin.crt")), "client-key": str(keys.path("admin.key"))}
        write_kubeconfig(kubeconfig, url, str(keys.ca_cert), admin)

        kcm_port = free_port()
        processes["kube-controller-manager"] = _spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token,job,clusterrole-aggregation",
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
        _wait(
            "kube-controller-manager",
            processes["kube-controller-manager"],
            folder,
            lambda: _https_ok(f"https://{LOOPBACK}:{kcm_port}/healthz", ssl._create_unverified_context()),
            timeout,
        )
        install_crds(kubeconfig, [*sorted(OUR_CRDS.glob("*.yaml")), *sorted(VENDORED_KUBERAY.glob("ray.io_*.yaml"))])

        probe_port = free_port()
        processes["ray-operator"] = _spawn(
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
        _wait(
            "ray-operator",
            processes["ray-operator"],
            folder,
            lambda: _https_ok(f"http://{LOOPBACK}:{probe_port}/readyz"),
            timeout,
        )
    except BaseException:
        _terminate({name: p.pid for name, p in processes.items()})
        raise
    plane = ControlPlane(folder, url, kubeconfig, {name: p.pid for name, p in processes.items()}, str(bin_dir))
    plane.save()
    return plane


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


def _terminate(pids: dict[str, int], grace: float = 15) -> None:
    """SIGTERM each process group (reverse start order), SIGKILL what is left after `grace`, and wait until
    every process is gone (or a zombie its parent has yet to reap)."""
    for pid in reversed(list(pids.values())):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    for pid in pids.values():
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids.values()):
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie); reaps it when it is our own child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def stop(folder: Path) -> list[str]:
    """Stop the control plane whose state is in `folder`; returns the names it stopped."""
    if not (folder / STATE_FILE).exists():
        return []
    plane = ControlPlane.load(folder)
    _terminate(plane.pids)
    (folder / STATE_FILE).unlink()
    return list(plane.pids)
