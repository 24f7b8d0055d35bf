"""`make k8s-up` and `make k8s-down` as the README runs them: a working kubeconfig, then nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil

from tests.chart_render import README_INSTALL


def make(target: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", target, f"K8S_DIR={folder}"], capture_output=True, text=True, timeout=600, check=False
    )


PLATFORM_UPGRADE = " ".join(
    [
        "helm upgrade batchinfer charts/batchinfer",
        "--namespace batchinfer-system",
        "-f charts/batchinfer/ci/classes-values.yaml",
    ]
)


def test_make_k8s_up_serves_our_crd_takes_the_helm_install_and_k8s_down_stops_every_process(tmp_path: Path) -> None:
    folder = tmp_path / "k8s"
    up = make("k8s-up", folder)
    assert up.returncode == 0, up.stdout + up.stderr
    pids = json.loads((folder / "state.json").read_text())["pids"]
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "ray-operator"}
    try:
        kubectl = Path("build/tools/kubectl").resolve()
        env = {**os.environ, "KUBECONFIG": str(folder / "kubeconfig")}
        crds = subprocess.run([str(kubectl), "get", "crd", "-o", "name"], capture_output=True, text=True, env=env)
        assert crds.returncode == 0, crds.stderr
        assert "batchinferences.batchinfer.dev" in crds.stdout and "rayjobs.ray.io" in crds.stdout
        # The README's install command, verbatim, on the chart as shipped, against a real API server.
        helm = Path("build/tools/helm").resolve()
        install = README_INSTALL.split()[1:]
        assert README_INSTALL in Path("README.md").read_text()
        installed = subprocess.run([str(helm), *install], capture_output=True, text=True, env=env, timeout=120)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "STATUS: deployed" in installed.stdout
        deploy = subprocess.run(
            [str(kubectl), "-n", "batchinfer-system", "get", "deployment", "batchinfer", "-o", "name"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert deploy.stdout.strip() == "deployment.apps/batchinfer", deploy.stderr
        # The platform section's command, verbatim: classes from values, on top of that install.
        upgrade = PLATFORM_UPGRADE.split()
        assert " ".join(upgrade) in Path("README.md").read_text()
        upgraded = subprocess.run([str(helm), *upgrade[1:]], capture_output=True, text=True, env=env, timeout=120)
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        shown = subprocess.run([str(kubectl), "get", "bic"], capture_output=True, text=True, env=env)
        rows = {line.split()[0]: line.split()[1:-1] for line in shown.stdout.splitlines()[1:]}
        assert rows == {"cpu": ["true", "0"], "gpu-a100": ["8"]}, shown.stdout + shown.stderr
        for pid in pids.values():  # every listener on loopback only
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    assert conn.laddr.ip == "127.0.0.1", conn
    finally:
        down = make("k8s-down", folder)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: etcd, kube-apiserver, kube-controller-manager, ray-operator" in down.stdout
    running = [pid for pid in pids.values() if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not running, [psutil.Process(pid).cmdline()[:1] for pid in running if psutil.pid_exists(pid)]
