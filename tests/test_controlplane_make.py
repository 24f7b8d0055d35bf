"""`make k8s-up` and `make k8s-down` as the README runs them: a working kubeconfig, a node that runs pods, then
nothing left behind on the machine."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import yaml

from tests.chart_render import README_INSTALL
from tests.controlplane import node


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


BUSYBOX = f"{node.IMAGE_PREFIX}/busybox:1.35"
WEB_POD = f"""apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web}}}}
spec:
  containers:
  - name: web
    image: {BUSYBOX}
    imagePullPolicy: Never
    command: ["sh", "-c"]
    args: ["echo serving on $(hostname -i); mkdir -p /www; echo hello > /www/index.html; exec httpd -f -p 8080 -h /www"]
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}
"""


def check_pods_run(kubectl: Path, env: dict[str, str]) -> None:
    """A pod from a locally built image: Ready, logs, exec, cluster DNS, a Service, the API server through the
    `kubernetes` Service, and no route off the machine."""

    def k(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(kubectl), *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)

    assert k("apply", "-f", "-", stdin=WEB_POD).returncode == 0
    ready = k("wait", "--for=condition=Ready", "pod/web", "--timeout=90s")
    assert ready.returncode == 0, ready.stderr + k("describe", "pod", "web").stdout
    assert k("logs", "web").stdout.startswith("serving on 198.18."), k("logs", "web")
    get = 'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 5 web.default.svc.cluster.local 80 | tail -n 1'
    assert k("exec", "web", "--", "sh", "-c", get).stdout.strip() == "hello"  # DNS -> ClusterIP -> pod (itself)
    api = k("exec", "web", "--", "sh", "-c", "nc -w 5 kubernetes.default.svc.cluster.local 443 </dev/null; echo $?")
    assert api.stdout.strip().endswith("0"), api  # the API server, through its Service
    routes = k("exec", "web", "--", "ip", "route").stdout
    assert "default" not in routes and "198.19.0.0/16 via 198.18.0.1" in routes, routes
    out = k("exec", "web", "--", "sh", "-c", "nc -w 3 192.0.2.1 80 </dev/null 2>&1; echo rc=$?").stdout
    assert "Network is unreachable" in out, out  # TEST-NET-1: nothing leaves the machine


LOCAL_OPERATOR_IMAGE = (
    f"--set image.repository={node.IMAGE_PREFIX}/batchinfer-operator --set image.tag=dev --set image.pullPolicy=Never"
)
SAMPLE = Path("manifests/samples/resnet152-gpu-s3.yaml")


def kubectl_runner(kubectl: Path, env: dict[str, str]):
    def k(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(kubectl), *args], input=stdin, capture_output=True, text=True, env=env, timeout=150)

    return k


def check_the_operator_pod_is_ready(kubectl: Path, env: dict[str, str]) -> None:
    """The chart's operator pod, from the image built here: Ready (kopf's liveness), the chart's account."""
    k = kubectl_runner(kubectl, env)
    rollout = k("-n", "batchinfer-system", "rollout", "status", "deployment/batchinfer", "--timeout=120s")
    logs = k("-n", "batchinfer-system", "logs", "deployment/batchinfer", "--tail=30")
    assert rollout.returncode == 0, rollout.stderr + logs.stdout + logs.stderr
    pod = json.loads(k("-n", "batchinfer-system", "get", "pods", "-o", "json").stdout)["items"][0]
    assert pod["spec"]["serviceAccountName"] == "batchinfer"
    assert pod["spec"]["containers"][0]["image"] == f"{node.IMAGE_PREFIX}/batchinfer-operator:dev"
    assert k("create", "namespace", "ml-batch").returncode == 0


# Small enough for this node, so its head pod is scheduled and the kubelet tries (and fails) to pull its image.
NO_IMAGE = """apiVersion: batchinfer.dev/v1alpha1
kind: BatchInference
metadata: {name: no-image, namespace: ml-batch}
spec:
  model: {packaged: efficientnet_lite0}
  input: {uri: "s3://in/"}
  output: {uri: "s3://out/"}
  cluster:
    image: batchinfer.local/no-such-image:1
    head: {cpu: 100m, memory: 256Mi}
    workers: {replicas: 0, minReplicas: 0, maxReplicas: 0}
  preRunningDeadlineSeconds: 120
"""


def check_the_operator_turns_the_sample_into_a_rayjob(kubectl: Path, env: dict[str, str]) -> None:
    """The in-cluster operator alone turns a sample BatchInference into a RayJob, through the `kubernetes`
    Service with the chart's RBAC."""
    k = kubectl_runner(kubectl, env)
    assert k("-n", "ml-batch", "apply", "-f", str(SAMPLE)).returncode == 0
    name = yaml.safe_load(SAMPLE.read_text())["metadata"]["name"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        owners = k("-n", "ml-batch", "get", "rayjob", name, "-o", "jsonpath={.metadata.ownerReferences[0].kind}")
        if owners.stdout == "BatchInference":
            break
        time.sleep(1)
    assert owners.stdout == "BatchInference", (
        owners.stderr + k("-n", "batchinfer-system", "logs", "deploy/batchinfer").stdout
    )


def check_waiting_jobs_say_why_and_the_wait_is_bounded(kubectl: Path, env: dict[str, str]) -> None:
    """The real scheduler and kubelet: the GPU sample's pods cannot be scheduled here, the no-image job's image
    cannot be pulled. Each BatchInference names that while Pending (status and a Warning Event), and the
    no-image job fails at its preRunningDeadlineSeconds with the reason it waited on."""
    k = kubectl_runner(kubectl, env)
    sample = yaml.safe_load(SAMPLE.read_text())["metadata"]["name"]

    def status(name: str) -> dict:
        got = k("-n", "ml-batch", "get", "bi", name, "-o", "json")
        return json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}

    deadline = time.monotonic() + 240  # the operator's resync (60 s) and the 120 s pre-running deadline
    while time.monotonic() < deadline:
        gpu, no_image = status(sample), status("no-image")
        if gpu.get("reason") == "Unschedulable" and no_image.get("phase") == "Failed":
            break
        time.sleep(5)
    logs = k("-n", "batchinfer-system", "logs", "deploy/batchinfer", "--tail=40").stdout
    assert gpu.get("reason") == "Unschedulable" and gpu.get("phase") == "Pending", (gpu, logs)
    assert "Unschedulable: 0/1 nodes are available" in gpu["message"], gpu
    assert no_image.get("reason") == "PreRunningDeadlineExceeded", (no_image, logs)
    assert "the job was waiting on: waiting to run: pod " in no_image["message"], no_image
    assert "ImagePullBackOff" in no_image["message"] or "ErrImagePull" in no_image["message"], no_image
    events = json.loads(k("-n", "ml-batch", "get", "events", "-o", "json").stdout)["items"]
    warned = {(e["involvedObject"]["name"], e["reason"]) for e in events if e["type"] == "Warning"}
    assert (sample, "Unschedulable") in warned, warned
    assert {("no-image", "ImagePullBackOff"), ("no-image", "ErrImagePull")} & warned, warned


def test_make_k8s_up_runs_pods_takes_the_helm_install_and_k8s_down_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "k8s"
    up = make("k8s-up", folder)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((folder / "state.json").read_text())
    pids, node_pids = state["pids"], state["node"]
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "ray-operator"}
    assert set(node_pids) == {"containerd", "kube-scheduler", "kubelet", "kube-proxy"}
    try:
        kubectl = Path("build/tools/kubectl").resolve()
        env = {**os.environ, "KUBECONFIG": str(folder / "kubeconfig")}
        check_pods_run(kubectl, env)
        crds = subprocess.run([str(kubectl), "get", "crd", "-o", "name"], capture_output=True, text=True, env=env)
        assert crds.returncode == 0, crds.stderr
        assert "batchinferences.batchinfer.dev" in crds.stdout and "rayjobs.ray.io" in crds.stdout
        # The README's install command, verbatim, on the chart as shipped, against a real API server; only the
        # operator image is the one `make k8s-up` built from operator/Dockerfile (as the README's local section says).
        helm = Path("build/tools/helm").resolve()
        install = [*README_INSTALL.split()[1:], *LOCAL_OPERATOR_IMAGE.split()]
        assert README_INSTALL in Path("README.md").read_text()
        shell_lines = " ".join(Path("README.md").read_text().replace("\\\n", " ").split())  # joined at "\"
        assert f"{README_INSTALL} {LOCAL_OPERATOR_IMAGE}" in shell_lines
        installed = subprocess.run([str(helm), *install], capture_output=True, text=True, env=env, timeout=120)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "STATUS: deployed" in installed.stdout
        check_the_operator_pod_is_ready(kubectl, env)
        assert kubectl_runner(kubectl, env)("apply", "-f", "-", stdin=NO_IMAGE).returncode == 0  # before classes
        # The platform section's command, verbatim: classes from values, on top of that install.
        upgrade = PLATFORM_UPGRADE.split()
        assert " ".join(upgrade) in Path("README.md").read_text()
        upgrade += LOCAL_OPERATOR_IMAGE.split()
        upgraded = subprocess.run([str(helm), *upgrade[1:]], capture_output=True, text=True, env=env, timeout=120)
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        shown = subprocess.run([str(kubectl), "get", "bic"], capture_output=True, text=True, env=env)
        rows = {line.split()[0]: line.split()[1:-1] for line in shown.stdout.splitlines()[1:]}
        assert rows == {"cpu": ["true", "0"], "gpu": ["8"], "gpu-a100": ["8"]}, shown.stdout + shown.stderr
        check_the_operator_turns_the_sample_into_a_rayjob(kubectl, env)  # the sample names the `gpu` class
        check_waiting_jobs_say_why_and_the_wait_is_bounded(kubectl, env)
        for pid in [*pids.values(), *node_pids.values()]:  # every listener on loopback or the node's address
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    assert conn.laddr.ip in ("127.0.0.1", node.GATEWAY), conn
    finally:
        down = make("k8s-down", folder)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: etcd, kube-apiserver, kube-controller-manager, ray-operator, containerd" in down.stdout
    # processes, mounts, links, iptables rules, namespaces, cgroups, sysctls, the kubelet's fixed paths
    assert node.leftovers(folder, [*pids.values(), *node_pids.values()]) == []
