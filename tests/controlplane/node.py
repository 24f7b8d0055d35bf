"""A real node beside the control plane: containerd + runc, CNI bridge, kubelet, kube-scheduler, kube-proxy and
CoreDNS (as a pod), so pods run on this machine. Needs root (Debian's packages: `make node-packages`).

Network: pods in 198.18.0.0/16 on bridge `bi0` (the node and the API server at 198.18.0.1), Services in
198.19.0.0/16 — the RFC 2544 benchmarking range. Pods get no default route and no NAT off the machine, and a
mangle-table guard drops any forwarded packet that leaves 198.18.0.0/15 (`host`). Everything this starts or
changes is recorded in the folder and undone by `stop` and `host.network_down`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import yaml

from tests.controlplane import pki
from tests.controlplane.host import (
    GATEWAY,
    KUBERNETES_SERVICE_IP,
    SERVICE_CIDR,
    NodeError,
    check_host,
    kill_leftover_shims,
    kubectl_binary,
    leftovers,
    mounts_under,
    network_down,
    network_up,
    remove_cgroups,
    remove_fixed_paths,
    remove_kube_chains,
    restore_sysctls,
    run,
    set_sysctl,
)
from tests.controlplane.images import IMAGE_PREFIX, import_images, node_images, oci_image, project_images
from tests.controlplane.node_config import (
    NODE_NAME,
    containerd_config,
    coredns_manifests,
    kube_proxy_config,
    kubeconfig,
    kubelet_config,
)
from tests.controlplane.processes import free_port, https_ok, spawn, terminate, wait_ready

__all__ = [
    "GATEWAY",
    "IMAGE_PREFIX",
    "KUBERNETES_SERVICE_IP",
    "SERVICE_CIDR",
    "NodeError",
    "check_host",
    "deploy",
    "leftovers",
    "network_down",
    "network_up",
    "node_images",
    "oci_image",
    "project_images",
    "start",
    "stop",
]


def _kubectl(admin_kubeconfig: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [kubectl_binary(), f"--kubeconfig={admin_kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


# The kubelet evicts pods below 1 GiB free (node_config's evictionHard); the jobs' pods write logs and Ray's spill
# files in their containers. Below this, pods would be evicted or stall mid-run: refuse to start, saying so.
MIN_FREE_BYTES = 3 * 2**30


def check_free_disk(folder: Path) -> None:
    """Refuse a node without room to run the jobs once its images are in, naming the disk and what to free."""
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise NodeError(
            f"the node needs {MIN_FREE_BYTES / 2**30:.0f} GiB free on the disk of {folder} once its images are"
            f" imported; {free / 2**30:.1f} GiB is free: free some (pip and Go caches, /var/lib/containers,"
            " old build/ folders) and run make k8s-up again"
        )


def start(
    folder: Path,
    url: str,
    keys: pki.Pki,
    admin_kubeconfig: Path,
    bins: Path,
    images: dict[str, Path],
    timeout: float = 180,
) -> dict[str, int]:
    """containerd, kube-scheduler, kubelet (node Ready), kube-proxy and CoreDNS (Ready); returns their pids.

    The network (`network_up`) and the control plane come first: the API server listens on the bridge.
    """
    processes: dict[str, subprocess.Popen] = {}
    try:
        processes["containerd"] = spawn(
            "containerd", ["containerd", "--config", str(containerd_config(folder))], folder
        )
        socket = folder / "run" / "containerd.sock"
        wait_ready("containerd", processes["containerd"], folder, socket.exists, timeout)
        import_images(folder, images)
        check_free_disk(folder)

        creds = {}
        for name, common, org in (
            ("kubelet", f"system:node:{NODE_NAME}", "system:nodes"),
            ("kube-proxy", "system:kube-proxy", None),
            ("kube-scheduler", "system:kube-scheduler", None),
        ):
            cert, key = pki.issue(keys, name, common, org)
            creds[name] = kubeconfig(folder, url, keys.ca_cert, name, cert, key)
        serving = pki.issue(keys, "kubelet-serving", NODE_NAME, None, server_ips=(GATEWAY,))

        scheduler = creds["kube-scheduler"]
        port = free_port()
        processes["kube-scheduler"] = spawn(
            "kube-scheduler",
            [
                str(bins / "kube-scheduler"),
                f"--kubeconfig={scheduler}",
                f"--authentication-kubeconfig={scheduler}",
                f"--authorization-kubeconfig={scheduler}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--v=1",
            ],
            folder,
        )
        processes["kubelet"] = spawn(
            "kubelet",
            [
                str(bins / "kubelet"),
                f"--config={kubelet_config(folder, keys, serving)}",
                f"--kubeconfig={creds['kubelet']}",
                f"--root-dir={folder / 'kubelet'}",
                f"--node-ip={GATEWAY}",
                f"--hostname-override={NODE_NAME}",
                "--v=1",
            ],
            folder,
        )

        def node_ready() -> bool:
            jsonpath = '{.status.conditions[?(@.type=="Ready")].status}'
            got = _kubectl(admin_kubeconfig, "get", "node", NODE_NAME, "-o", f"jsonpath={jsonpath}")
            return got.stdout.strip() == "True"

        wait_ready("kubelet", processes["kubelet"], folder, node_ready, timeout)
        restore_sysctls(folder)  # the kubelet rewrote kernel.panic, kernel.panic_on_oops, vm.overcommit_memory
        set_sysctl("net.ipv4.ip_forward", "1")
        healthz, metrics = free_port(), free_port()
        proxy_config = kube_proxy_config(folder, creds["kube-proxy"], healthz, metrics)
        processes["kube-proxy"] = spawn(
            "kube-proxy", [str(bins / "kube-proxy"), f"--config={proxy_config}", "--v=1"], folder
        )
        wait_ready(
            "kube-proxy",
            processes["kube-proxy"],
            folder,
            lambda: https_ok(f"http://127.0.0.1:{healthz}/healthz"),
            timeout,
        )
        deploy(admin_kubeconfig, coredns_manifests(), "kube-system", "coredns", timeout)
    except BaseException:
        stop(folder, {name: p.pid for name, p in processes.items()}, admin_kubeconfig)
        raise
    return {name: p.pid for name, p in processes.items()}


def deploy(
    admin_kubeconfig: Path,
    documents: list[dict],
    namespace: str,
    deployment: str,
    timeout: float,
    server_side: bool = False,
) -> None:
    """Apply manifests (`server_side`: as `kubectl apply --server-side`, for CRDs too large for the annotation
    client-side apply keeps) and wait until their Deployment has rolled out."""
    how = ["--server-side"] if server_side else []
    applied = _kubectl(admin_kubeconfig, "apply", *how, "-f", "-", stdin=yaml.safe_dump_all(documents))
    if applied.returncode != 0:
        raise NodeError(f"the manifests of {deployment} were refused: {applied.stderr.strip()}")
    rollout = _kubectl(
        admin_kubeconfig, "-n", namespace, "rollout", "status", f"deployment/{deployment}", f"--timeout={int(timeout)}s"
    )
    if rollout.returncode != 0:
        logs = _kubectl(admin_kubeconfig, "-n", namespace, "logs", f"deployment/{deployment}", "--tail=20")
        raise NodeError(
            f"{deployment} did not become ready: {rollout.stderr.strip() or rollout.stdout.strip()}\n{logs.stdout}"
        )


def stop(folder: Path, pids: dict[str, int], admin_kubeconfig: Path | None = None) -> list[str]:
    """Stop the node and undo what it changed on the host; returns what was left and had to be removed."""
    notes: list[str] = []
    sock = folder / "run" / "containerd.sock"
    # The scheduler first: Deployments' replacements for the pods deleted below then stay Pending.
    terminate({name: pid for name, pid in pids.items() if name == "kube-scheduler"})
    if admin_kubeconfig is not None and "kubelet" in pids:
        # Pods first, through the kubelet: CNI DEL for each, volumes unmounted, containers stopped.
        _kubectl(
            admin_kubeconfig,
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
        )
        ctr = ["ctr", "--address", str(sock), "-n", "k8s.io"]
        deadline = time.monotonic() + 60
        while sock.exists() and time.monotonic() < deadline:
            tasks = run(*ctr, "tasks", "ls", check=False).stdout.splitlines()[1:]  # TASK PID STATUS
            if not any(line.split()[-1:] == ["RUNNING"] for line in tasks):
                break
            time.sleep(0.5)
    terminate({name: pid for name, pid in pids.items() if name in ("kube-proxy", "kubelet")})
    if sock.exists():
        ctr = ["ctr", "--address", str(sock), "-n", "k8s.io"]
        for task in run(*ctr, "tasks", "ls", "-q", check=False).stdout.split():
            run(*ctr, "tasks", "kill", "-s", "SIGKILL", task, check=False)
            notes.append(f"killed container {task}")
    terminate({name: pid for name, pid in pids.items() if name == "containerd"})
    kill_leftover_shims(folder, notes)
    for mount in sorted(mounts_under(folder), reverse=True):
        if run("umount", mount, check=False).returncode != 0:
            run("umount", "-l", mount, check=False)
        notes.append(f"unmounted {mount}")
    proxy_config = folder / "etc" / "kube-proxy.yaml"
    bins_proxy = _binary_of(folder, "kube-proxy")
    if proxy_config.exists() and bins_proxy:
        run(bins_proxy, "--cleanup", f"--config={proxy_config}", check=False)
    remove_kube_chains()
    notes += [f"restored {name}" for name in restore_sysctls(folder)]
    remove_cgroups(notes)
    remove_fixed_paths(folder)
    return notes


def _binary_of(folder: Path, name: str) -> str | None:
    recorded = folder / "node-binaries"
    return str(Path(recorded.read_text().strip()) / name) if recorded.exists() else None
