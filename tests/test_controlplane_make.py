"""The node tier: one `make k8s-up` for the module, as the README runs it (a control plane, a node that runs
pods, an S3 the pods reach); the chart installed as users install it; the README's cluster demo verbatim, a
BatchInference running to predictions in pods; the README's Kueue steps on Kueue's own controller; then
`make k8s-down` leaves nothing behind on the machine.

Tests here run in file order on the one node (each leaves it as it found it)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import boto3
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from tests.chart_render import README_INSTALL
from tests.controlplane import node, object_store
from tests.controlplane.node_config import NODE_NAME

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "build" / "k8s"  # the README's folder: its steps `source build/k8s/env`


def make(target: str) -> subprocess.CompletedProcess:
    # Cold, k8s-up builds the job image (~5 GB of torch and Ray layers): minutes.
    return subprocess.run(["make", target], capture_output=True, text=True, timeout=2400, check=False, cwd=REPO)


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
    assert k("delete", "--wait=false", "-f", "-", stdin=WEB_POD).returncode == 0


LOCAL_IMAGES = " ".join(
    [
        f"--set image.repository={node.IMAGE_PREFIX}/batchinfer-operator --set image.tag=dev",
        "--set image.pullPolicy=Never",
        f"--set jobImage.repository={node.IMAGE_PREFIX}/batchinfer-job --set jobImage.tag=dev",
        "--set jobImage.pullPolicy=Never",
    ]
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


IMAGE_MISSING = ("ImagePullBackOff", "ErrImagePull", "ErrImageNeverPull")


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
    # The chart's jobImage.pullPolicy is Never here (images are imported, not pulled): the kubelet says
    # ErrImageNeverPull; with IfNotPresent it is ErrImagePull, then ImagePullBackOff.
    assert any(r in no_image["message"] for r in IMAGE_MISSING), no_image
    events = json.loads(k("-n", "ml-batch", "get", "events", "-o", "json").stdout)["items"]
    warned = {(e["involvedObject"]["name"], e["reason"]) for e in events if e["type"] == "Warning"}
    assert (sample, "Unschedulable") in warned, warned
    assert {("no-image", reason) for reason in IMAGE_MISSING} & warned, warned


@dataclass
class Node:
    """The module's `make k8s-up`: its state, kubectl and the environment of `build/k8s/env`."""

    pids: dict[str, int]
    node_pids: dict[str, int]
    env: dict[str, str]
    kubectl: Path

    def k(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return kubectl_runner(self.kubectl, self.env)(*args, stdin=stdin)


def env_file_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = value
    return values


def s3_client(env: dict[str, str]):
    """The cluster's S3 as `source build/k8s/env` gives it to every AWS tool."""
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture(scope="module")
def up() -> Iterator[Node]:
    started = make("k8s-up")
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    assert f"source {FOLDER / 'env'}" in started.stdout, started.stdout[-2000:]
    state = json.loads((FOLDER / "state.json").read_text())
    env = {**os.environ, **env_file_values(FOLDER / "env"), "PATH": f"{REPO / 'build' / 'tools'}:{os.environ['PATH']}"}
    try:
        yield Node(state["pids"], state["node"], env, REPO / "build" / "tools" / "kubectl")
    finally:
        if (FOLDER / "state.json").exists():  # a test before the last one failed: still leave nothing behind
            make("k8s-down")


def test_make_k8s_up_runs_pods_and_an_s3_both_sides_reach(up: Node) -> None:
    assert set(up.pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "s3"}
    assert set(up.node_pids) == {"containerd", "kube-scheduler", "kubelet", "kube-proxy"}
    check_pods_run(up.kubectl, up.env)
    # KubeRay as users run it: the module's own Deployment and ServiceAccount, from the binary built here.
    pod = json.loads(up.k("-n", "kuberay-system", "get", "pods", "-o", "json").stdout)["items"][0]
    assert pod["spec"]["serviceAccountName"] == "kuberay-operator"
    assert pod["spec"]["containers"][0]["image"] == f"{node.IMAGE_PREFIX}/kuberay-operator:v1.6.1"
    assert all(c["ready"] for c in pod["status"]["containerStatuses"]), pod["status"]
    # Kueue, from its config/default, the binary built here: ready means its webhooks answered (cluster.py).
    pod = json.loads(up.k("-n", "kueue-system", "get", "pods", "-o", "json").stdout)["items"][0]
    assert pod["spec"]["containers"][0]["image"] == f"{node.IMAGE_PREFIX}/kueue:v0.17.0"
    assert all(c["ready"] for c in pod["status"]["containerStatuses"]), pod["status"]
    # The kubelet as it runs: no image garbage collection (an imported image deleted is gone: node_config.py).
    configz = json.loads(up.k("get", "--raw", f"/api/v1/nodes/{NODE_NAME}/proxy/configz").stdout)
    kubelet = configz["kubeletconfig"]
    assert (kubelet["imageGCHighThresholdPercent"], kubelet["evictionHard"]["imagefs.available"]) == (100, "1Gi")
    crds = up.k("get", "crd", "-o", "name")
    assert crds.returncode == 0, crds.stderr
    assert "batchinferences.batchinfer.dev" in crds.stdout and "rayjobs.ray.io" in crds.stdout
    assert "workloads.kueue.x-k8s.io" in crds.stdout and "clusterqueues.kueue.x-k8s.io" in crds.stdout
    env = env_file_values(FOLDER / "env")
    assert env["KUBECONFIG"] == str(FOLDER / "kubeconfig")
    assert env["AWS_ENDPOINT_URL"] == env["BATCHINFER_S3_ENDPOINT_IN_CLUSTER"] == object_store.S3_ENDPOINT
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(env)
    s3 = s3_client(env)
    s3.put_object(Bucket=object_store.DEMO_BUCKET, Key="from-host.txt", Body=b"hello", ACL="public-read")
    pod = "s3-probe"
    fetch = f"wget -q -O- {env['BATCHINFER_S3_ENDPOINT_IN_CLUSTER']}/{object_store.DEMO_BUCKET}/from-host.txt"
    ran = up.k(
        "run", pod, "--restart=Never", f"--image={BUSYBOX}", "--image-pull-policy=Never", "--", "sh", "-c", fetch
    )
    assert ran.returncode == 0, ran.stderr
    eventually_phase = time.monotonic() + 60
    while time.monotonic() < eventually_phase:
        phase = up.k("get", "pod", pod, "-o", "jsonpath={.status.phase}").stdout
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    assert phase == "Succeeded" and up.k("logs", pod).stdout == "hello", (phase, up.k("logs", pod))
    up.k("delete", "pod", pod, "--wait=false")


def test_a_node_without_room_for_its_jobs_is_refused_naming_the_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(node.shutil, "disk_usage", lambda path: SimpleNamespace(free=node.MIN_FREE_BYTES // 2))
    said = rf"needs 3 GiB free on the disk of {re.escape(str(tmp_path))} once its images are imported; 1.5 GiB is free"
    with pytest.raises(node.NodeError, match=said):
        node.check_free_disk(tmp_path)
    monkeypatch.undo()
    node.check_free_disk(tmp_path)  # this machine has room (make k8s-up would refuse otherwise)


def test_the_chart_installs_as_the_readme_says_and_waiting_jobs_say_why(up: Node) -> None:
    """The README's install command, verbatim, on the chart as shipped, against a real API server; only the
    images are the ones `make k8s-up` built from the Dockerfiles (as the README's local section says)."""
    helm = REPO / "build" / "tools" / "helm"
    readme = (REPO / "README.md").read_text()
    install = [*README_INSTALL.split()[1:], *LOCAL_IMAGES.split()]
    assert README_INSTALL in readme
    assert f"{README_INSTALL} {LOCAL_IMAGES}" in " ".join(readme.replace("\\\n", " ").split())  # joined at "\"
    installed = subprocess.run([str(helm), *install], capture_output=True, text=True, env=up.env, timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "STATUS: deployed" in installed.stdout
    check_the_operator_pod_is_ready(up.kubectl, up.env)
    assert up.k("apply", "-f", "-", stdin=NO_IMAGE).returncode == 0  # before classes
    # The platform section's command, verbatim: classes from values, on top of that install.
    upgrade = PLATFORM_UPGRADE.split()
    assert " ".join(upgrade) in readme
    upgraded = subprocess.run(
        [str(helm), *upgrade[1:], *LOCAL_IMAGES.split()], capture_output=True, text=True, env=up.env, timeout=120
    )
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    shown = up.k("get", "bic")
    rows = {line.split()[0]: line.split()[1:-1] for line in shown.stdout.splitlines()[1:]}
    assert rows == {"cpu": ["true", "0"], "gpu": ["8"], "gpu-a100": ["8"]}, shown.stdout + shown.stderr
    check_the_operator_turns_the_sample_into_a_rayjob(up.kubectl, up.env)  # the sample names the `gpu` class
    check_waiting_jobs_say_why_and_the_wait_is_bounded(up.kubectl, up.env)
    # What follows runs real jobs: leave the node as the README's demo finds it (the chart, no namespace).
    assert up.k("delete", "namespace", "ml-batch", "--timeout=120s").returncode == 0
    assert up.k("delete", "bic", "--all").returncode == 0
    assert subprocess.run([str(helm), "uninstall", "batchinfer", "-n", "batchinfer-system", "--wait"], env=up.env,
                          capture_output=True, timeout=180).returncode == 0  # fmt: skip
    assert up.k("delete", "namespace", "batchinfer-system", "--timeout=120s").returncode == 0


DEMO_SCRIPT = REPO / "tests" / "e2e" / "cluster_demo.sh"


def script_commands(script: Path) -> list[str]:
    """A script's commands after its `set -x`, each with its spaces normalised."""
    lines = script.read_text().splitlines()
    return [" ".join(line.split()) for line in lines[lines.index("set -x") + 1 :] if line.strip()]


def readme_block(heading: str, first: str) -> list[str]:
    """The commands of the first bash block starting with `first` under the README's `heading` (lines joined at
    a trailing backslash, comments dropped, spaces normalised)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(heading) :]
    block = re.search(rf"```bash\n({re.escape(first)}\b.*?)```", section, re.S)
    assert block, f"the README's {heading!r} section has no bash block starting with {first}"
    lines = block[1].replace("\\\n", " ").splitlines()
    return [" ".join(line.split("  #")[0].split()) for line in lines if line.strip()]


def test_the_readme_cluster_demo_is_what_make_cluster_demo_runs() -> None:
    assert readme_block("### A real cluster on one machine", "make k8s-up") == [
        "make k8s-up",
        *script_commands(DEMO_SCRIPT),
        "make k8s-down",
    ]
    recipe = re.search(r"^cluster-demo:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert recipe and "k8s-up" in recipe[1] and "bash tests/e2e/cluster_demo.sh" in recipe[1]
    assert "k8s-down" in recipe[1]
    # make kind-e2e (Docker) runs the same sample and checks the same results line.
    kind = (REPO / "tests" / "e2e" / "kind_e2e.sh").read_text()
    assert "manifests/samples/local-cluster.yaml" in kind
    assert "s3://demo/predictions/: 97 inputs, 96 predicted, 1 error rows" in kind


class StatusWatch:
    """What `kubectl get bi -w` would show: every distinct (phase, progress) of one BatchInference."""

    def __init__(self, node: Node, namespace: str, name: str) -> None:
        self.node, self.namespace, self.name = node, namespace, name
        self.seen: list[tuple[str, str]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.is_set():
            got = self.node.k("-n", self.namespace, "get", "bi", self.name, "-o", "json")
            if got.returncode == 0:
                status = json.loads(got.stdout).get("status", {})
                seen = (status.get("phase", ""), status.get("progress", {}).get("display", ""))
                if not self.seen or self.seen[-1] != seen:
                    self.seen.append(seen)
            self.done.wait(1)

    def stop(self) -> list[tuple[str, str]]:
        self.done.set()
        self.thread.join()
        return self.seen


def test_the_readme_cluster_demo_runs_a_batchinference_to_predictions_in_pods(up: Node) -> None:
    """kubectl apply → RayJob → RayCluster → head and worker pods → submitter → predictions on S3: every input
    once, the corrupt one an error row; progress written by the job from inside the head pod; then the
    RayCluster and its pods gone after ttlSecondsAfterFinished."""
    watch = StatusWatch(up, "demo", "local-cluster")
    try:
        demo = subprocess.run(
            ["bash", str(DEMO_SCRIPT)], capture_output=True, text=True, env=up.env, cwd=REPO, timeout=1200
        )
    finally:
        seen = watch.stop()
    logs = up.k("-n", "batchinfer-system", "logs", "deploy/batchinfer", "--tail=40").stdout
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:] + diagnosis(up, "demo") + logs
    assert re.search(r"local-cluster\s+\S*\s*Succeeded\s+97/97", demo.stdout), demo.stdout[-2000:]
    assert "s3://demo/predictions/: 97 inputs, 96 predicted, 1 error rows" in demo.stdout, demo.stdout[-2000:]
    assert re.search(r"chelsea\s+(tabby|tiger cat|Egyptian cat)", demo.stdout), demo.stdout[-2000:]
    # Progress before the end: only the job, from its head pod, writes status.progress.
    running = [display for phase, display in seen if phase == "Running" and display]
    assert running, seen

    s3 = s3_client(env_file_values(FOLDER / "env"))
    listed = s3.list_objects_v2(Bucket="demo", Prefix="images/")["Contents"]
    inputs = {f"s3://demo/{o['Key']}" for o in listed}
    manifest = json.loads(s3.get_object(Bucket="demo", Key="predictions/_SUCCESS.json")["Body"].read())
    rows = []
    for shard in manifest["shards"]:
        body = s3.get_object(Bucket="demo", Key=f"predictions/{shard['file']}")["Body"].read()
        rows += pq.read_table(io.BytesIO(body)).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(inputs)  # every input exactly once
    errors = [r for r in rows if r["error"] is not None]
    assert [r["key"] for r in errors] == ["s3://demo/images/corrupt_000.jpg"], errors

    bi = json.loads(up.k("-n", "demo", "get", "bi", "local-cluster", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in bi["status"]["conditions"]}
    assert conditions == {"Running": "False", "Succeeded": "True", "Failed": "False"}, bi["status"]
    events = json.loads(up.k("-n", "demo", "get", "events", "-o", "json").stdout)["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == "local-cluster"}
    assert {"Created", "Running", "Succeeded"} <= reasons, reasons
    # ttlSecondsAfterFinished: 30 in the sample; KubeRay deletes the RayCluster, the GC its pods.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        left = up.k("-n", "demo", "get", "raycluster", "-o", "name").stdout.split()
        left += pod_names(up, "demo", "ray.io/node-type")  # head and workers (the submitter has no such label)
        if not left:
            break
        time.sleep(3)
    assert not left, left
    assert up.k("-n", "demo", "get", "rayjob", "-o", "name").stdout.strip(), "the RayJob is kept"
    # What stays until the RayJob goes: the submitter Job's finished pod, holding no CPU.
    phases = up.k("-n", "demo", "get", "pods", "-o", "jsonpath={.items[*].status.phase}").stdout.split()
    assert phases == ["Succeeded"], phases


SAMPLE_DEMO = REPO / "manifests" / "samples" / "local-cluster.yaml"
DEMO_INPUTS = 97  # the demo's photos: 12 of each of 8, and one corrupt file


def demo_variant(name: str, namespace: str, **spec: object) -> str:
    """The cluster demo's sample under another name and output prefix, with `spec` fields replaced."""
    body = yaml.safe_load(SAMPLE_DEMO.read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["output"]["uri"] = f"s3://demo/{name}/"
    body["spec"].update(spec)
    return yaml.safe_dump(body)


def job_namespace(up: Node, name: str, labels: dict[str, str] | None = None) -> None:
    """A namespace holding the demo's S3 Secret, as the README's steps make it."""
    assert up.k("create", "namespace", name).returncode == 0
    for key, value in (labels or {}).items():
        assert up.k("label", "namespace", name, f"{key}={value}").returncode == 0
    env = env_file_values(FOLDER / "env")
    secret = [f"--from-literal={k}={env[k]}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    assert up.k("-n", name, "create", "secret", "generic", "demo-s3", *secret).returncode == 0


def bi_status(up: Node, namespace: str, name: str) -> dict:
    got = up.k("-n", namespace, "get", "bi", name, "-o", "json")
    return json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}


def processed(status: dict) -> int:
    """Rows the job reported committed (`status.progress.display` is `done/total (pct)`)."""
    match = re.match(r"(\d+)/", status.get("progress", {}).get("display", ""))
    return int(match[1]) if match else 0


# The demo's first shard commits a few minutes after the apply here; each wait ends before the test's own timeout, so a
# stuck job fails with its diagnosis rather than pytest-timeout's thread dump.
FIRST_SHARD_S = 420


def wait_for(up: Node, what: str, check, timeout: float, namespace: str) -> dict:
    """Poll `check(status)` on the only BatchInference of `namespace` until it holds; the status it held on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = json.loads(up.k("-n", namespace, "get", "bi", "-o", "json").stdout or "{}").get("items", [])
        status = items[0].get("status", {}) if items else {}
        if check(status):
            return status
        time.sleep(2)
    seen = diagnosis(up, namespace)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last status {status}\n{seen}")


def first_shard(up: Node, namespace: str) -> dict:
    """Wait until the job of `namespace` committed some of the demo's inputs, not all; that status."""
    return wait_for(up, "the first committed shard", lambda s: 0 < processed(s) < DEMO_INPUTS, FIRST_SHARD_S, namespace)


def diagnosis(up: Node, namespace: str) -> str:
    """What a stuck job needs looked at: its objects and pods, their last events, the node's conditions and disk."""
    objects = up.k("-n", namespace, "get", "bi,rayjob,raycluster,workloads,pods", "-o", "wide").stdout
    said = "\n".join(
        f"{e.get('lastTimestamp')} {e['type']} {e['reason']} {e['involvedObject']['name']}: {e['message']}"
        for e in sorted(events(up, namespace), key=lambda e: e.get("lastTimestamp") or "")[-15:]
    )
    conditions = up.k("get", "nodes", "-o", "jsonpath={range .items[*].status.conditions[*]}{.type}={.status} {end}")
    disk = subprocess.run(["df", "-h", "/"], capture_output=True, text=True).stdout
    return f"{objects}\nlast events:\n{said}\nnode: {conditions.stdout}\n{disk}"


def pod_names(up: Node, namespace: str, selector: str) -> list[str]:
    return up.k("-n", namespace, "get", "pods", "-l", selector, "-o", "name").stdout.split()


def committed_keys(name: str) -> tuple[list[str], dict]:
    s3 = s3_client(env_file_values(FOLDER / "env"))
    manifest = json.loads(s3.get_object(Bucket="demo", Key=f"{name}/_SUCCESS.json")["Body"].read())
    keys = []
    for shard in manifest["shards"]:
        body = s3.get_object(Bucket="demo", Key=f"{name}/{shard['file']}")["Body"].read()
        keys += pq.read_table(io.BytesIO(body), columns=["key"]).column("key").to_pylist()
    return keys, manifest


def events(up: Node, namespace: str) -> list[dict]:
    return json.loads(up.k("-n", namespace, "get", "events", "-o", "json").stdout)["items"]


def demo_inputs() -> list[str]:
    s3 = s3_client(env_file_values(FOLDER / "env"))
    return sorted(f"s3://demo/{o['Key']}" for o in s3.list_objects_v2(Bucket="demo", Prefix="images/")["Contents"])


@pytest.mark.timeout(FIRST_SHARD_S + 600 + 120)
def test_a_restricted_namespace_job_survives_losing_its_worker_and_the_operator_pod(up: Node) -> None:
    """Pod Security `restricted` admits every pod of the job; a worker pod killed mid-run (no grace) and the
    operator pod deleted mid-run: the job still finishes with every input exactly once, the Deployment brings
    the operator back, no second RayJob is made, and progress keeps moving."""
    namespace = "restricted-demo"
    job_namespace(up, namespace, {"pod-security.kubernetes.io/enforce": "restricted"})
    assert up.k("apply", "-f", "-", stdin=demo_variant("survivor", namespace)).returncode == 0
    first = first_shard(up, namespace)
    workers = pod_names(up, namespace, "ray.io/node-type=worker")
    operators = pod_names(up, "batchinfer-system", "app.kubernetes.io/name=batchinfer")
    assert len(workers) == 1 and len(operators) == 1, (workers, operators)
    killed = up.k("-n", namespace, "delete", workers[0], "--grace-period=0", "--force")
    assert killed.returncode == 0, killed.stderr
    assert up.k("-n", "batchinfer-system", "delete", operators[0], "--wait=false").returncode == 0
    done = wait_for(up, "Succeeded", lambda s: s.get("phase") in ("Succeeded", "Failed"), 600, namespace)
    assert done["phase"] == "Succeeded", done
    assert processed(done) == DEMO_INPUTS > processed(first), (first, done)
    keys, manifest = committed_keys("survivor")
    assert sorted(keys) == demo_inputs(), "every input exactly once"
    assert manifest["counts"]["failed"] == 1, manifest["counts"]
    assert len(up.k("-n", namespace, "get", "rayjobs", "-o", "name").stdout.split()) == 1  # no second RayJob
    now = pod_names(up, "batchinfer-system", "app.kubernetes.io/name=batchinfer")
    assert len(now) == 1 and now != operators, (operators, now)
    refused = [
        e for e in events(up, namespace) if e["reason"] == "FailedCreate" and "PodSecurity" in e.get("message", "")
    ]
    assert not refused, refused
    assert up.k("delete", "namespace", namespace, "--timeout=180s").returncode == 0


@pytest.mark.timeout(FIRST_SHARD_S + 720 + 120)
def test_losing_the_head_reruns_the_job_and_resumes_its_committed_shards(up: Node) -> None:
    """The head pod killed mid-run (backoffLimit 1): KubeRay 1.6.1 recreates the head in the same RayCluster and
    the submitter Job submits the job again (the RayJob never fails, so it is not retried: the phase stays
    Running); the rerun skips the shards the first run committed; Succeeded, every input exactly once."""
    namespace = "retry-demo"
    job_namespace(up, namespace)
    assert up.k("apply", "-f", "-", stdin=demo_variant("resumer", namespace, backoffLimit=1)).returncode == 0
    first_shard(up, namespace)
    (head,) = pod_names(up, namespace, "ray.io/node-type=head")
    assert up.k("-n", namespace, "delete", head, "--grace-period=0", "--force").returncode == 0
    phases = []

    def finished(status: dict) -> bool:
        if not phases or phases[-1] != status.get("phase"):
            phases.append(status.get("phase"))
        return status.get("phase") in ("Succeeded", "Failed")

    done = wait_for(up, "Succeeded after a rerun", finished, 720, namespace)
    assert done["phase"] == "Succeeded", (done, phases)
    keys, manifest = committed_keys("resumer")
    assert sorted(keys) == demo_inputs(), "every input exactly once"
    assert manifest["attempt"]["resumed"] > 0, manifest["attempt"]  # the rerun skipped what was committed
    heads = {e["involvedObject"]["name"] for e in events(up, namespace) if e["reason"] == "Pulled"}
    assert sum(name.startswith("resumer-") and "-head-" in name for name in heads) == 2, heads
    assert up.k("delete", "namespace", namespace, "--timeout=180s").returncode == 0


def test_a_passed_deadline_fails_the_job_and_removes_its_ray_pods(up: Node) -> None:
    namespace = "deadline-demo"
    job_namespace(up, namespace)
    assert up.k("apply", "-f", "-", stdin=demo_variant("late", namespace, activeDeadlineSeconds=20)).returncode == 0
    done = wait_for(up, "Failed", lambda s: s.get("phase") in ("Succeeded", "Failed"), 300, namespace)
    assert done["phase"] == "Failed" and done["reason"] == "DeadlineExceeded", done
    # KubeRay ends the attempt at the deadline and deletes the RayCluster after ttlSecondsAfterFinished; the
    # RayJob stays, as for every finished job, holding no pod (it goes with the BatchInference).
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        clusters = up.k("-n", namespace, "get", "raycluster", "-o", "name").stdout.split()
        ray_pods = pod_names(up, namespace, "ray.io/node-type")
        running = up.k("-n", namespace, "get", "pods", "-o", "jsonpath={.items[*].status.phase}").stdout.split()
        if not clusters and not ray_pods and "Running" not in running:
            break
        time.sleep(3)
    assert not clusters and not ray_pods and "Running" not in running, (clusters, ray_pods, running)
    rayjob = json.loads(up.k("-n", namespace, "get", "rayjob", "late", "-o", "json").stdout)["status"]
    assert rayjob["jobDeploymentStatus"] == "Failed" and rayjob["reason"] == "DeadlineExceeded", rayjob
    assert up.k("delete", "namespace", namespace, "--timeout=180s").returncode == 0


def test_deleting_a_batchinference_mid_run_removes_every_pod_and_leaves_storage_alone(up: Node) -> None:
    namespace = "dropped-demo"
    job_namespace(up, namespace)
    assert up.k("apply", "-f", "-", stdin=demo_variant("dropped", namespace)).returncode == 0
    first_shard(up, namespace)
    s3 = s3_client(env_file_values(FOLDER / "env"))
    written = {o["Key"] for o in s3.list_objects_v2(Bucket="demo", Prefix="dropped/").get("Contents", [])}
    assert up.k("-n", namespace, "delete", "bi", "dropped", "--timeout=120s").returncode == 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        left = up.k("-n", namespace, "get", "rayjob,raycluster,pods", "-o", "name").stdout.split()
        if not left:
            break
        time.sleep(3)
    assert not left, left
    assert demo_inputs() and len(demo_inputs()) == DEMO_INPUTS
    after = {o["Key"] for o in s3.list_objects_v2(Bucket="demo", Prefix="dropped/").get("Contents", [])}
    assert written and written <= after, (written, after)  # committed shards are kept for a rerun to resume
    assert up.k("delete", "namespace", namespace, "--timeout=180s").returncode == 0


KUEUE_SCRIPT = REPO / "tests" / "e2e" / "kueue_demo.sh"
KUEUE_NAMESPACE = "kueue-demo"


def test_the_readme_kueue_steps_are_what_the_kueue_test_runs() -> None:
    assert readme_block("### With Kueue", "kubectl create namespace kueue-demo") == script_commands(KUEUE_SCRIPT)


class TableWatch:
    """`kubectl get <what> -o wide` every second: each distinct row of each object, as {column: value}."""

    def __init__(self, node: Node, namespace: str, what: str) -> None:
        self.node, self.namespace, self.what = node, namespace, what
        self.rows: dict[str, list[dict[str, str]]] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.is_set():
            self._look()
            self.done.wait(1)

    def _look(self) -> None:
        shown = self.node.k("-n", self.namespace, "get", self.what, "-o", "wide").stdout.splitlines()
        if not shown:
            return
        starts = [m.start() for m in re.finditer(r"\S+", shown[0])]
        names = shown[0].split()
        for line in shown[1:]:
            cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
            row = dict(zip(names, cells, strict=True))
            seen = self.rows.setdefault(row["NAME"], [])
            if not seen or {k: v for k, v in seen[-1].items() if k != "AGE"} != {
                k: v for k, v in row.items() if k != "AGE"
            }:
                seen.append(row)

    def stop(self) -> dict[str, list[dict[str, str]]]:
        """Stop polling, after one last look (what changed since the last poll is seen too)."""
        self.done.set()
        self.thread.join()
        self._look()
        return self.rows

    def phases(self, name: str) -> list[str]:
        out: list[str] = []
        for row in self.rows.get(name, []):
            if row["PHASE"] and (not out or out[-1] != row["PHASE"]):
                out.append(row["PHASE"])
        return out


def spec_writers(rayjob: dict) -> dict[str, str]:
    """Manager → time of its last write, for each managedFields entry that owns something under spec."""
    return {
        entry["manager"]: entry["time"]
        for entry in rayjob["metadata"].get("managedFields", [])
        if entry.get("subresource") is None and "f:spec" in entry.get("fieldsV1", {})
    }


QUEUED_CLASS = """apiVersion: batchinfer.dev/v1alpha1
kind: BatchInferenceClass
metadata:
  name: queued
spec:
  defaults:
    scheduling: {queueName: batch}
"""


@pytest.mark.timeout(1500)  # two demo jobs one after the other, then a third: about 9 min on this machine
def test_kueue_admits_queued_batchinferences_one_at_a_time_as_the_readme_says(up: Node) -> None:
    """Kueue's own controller (make k8s-up) and a ClusterQueue that fits one job: the README's steps verbatim.
    `catalog` is admitted and runs; `spot-check` waits Queued (naming Kueue and the queue) and runs once `catalog`
    is done; only Kueue unsuspends the RayJobs. Beside it, a job whose queue comes from its class waits behind
    both with a 30 s deadline that does not run while it is queued; and Kueue + autoscaling is refused."""
    assert up.k("apply", "-f", "-", stdin=QUEUED_CLASS).returncode == 0
    namespace = "kueue-deadline"
    job_namespace(up, namespace)
    queue = (
        "apiVersion: kueue.x-k8s.io/v1beta2\nkind: LocalQueue\nmetadata: {name: batch}\nspec: {clusterQueue: batch}\n"
    )
    bis = TableWatch(up, KUEUE_NAMESPACE, "bi")
    late = TableWatch(up, namespace, "bi")
    suspends: list[tuple[str, object, dict[str, str]]] = []  # (RayJob, spec.suspend, spec writers) as they change
    done = threading.Event()

    def watch_rayjobs() -> None:
        while not done.is_set():
            got = up.k("-n", KUEUE_NAMESPACE, "get", "rayjobs", "-o", "json", "--show-managed-fields")
            for rj in json.loads(got.stdout or '{"items": []}')["items"]:
                seen = (rj["metadata"]["name"], rj["spec"].get("suspend", False), spec_writers(rj))
                if seen not in suspends:
                    suspends.append(seen)
            done.wait(1)

    watcher = threading.Thread(target=watch_rayjobs, daemon=True)
    watcher.start()
    try:
        demo = subprocess.Popen(["bash", str(KUEUE_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=up.env, cwd=REPO)  # fmt: skip
        # Queued behind both demo jobs, once they are on the queue: the class gives the queue.
        deadline = time.monotonic() + 600
        while not bi_status(up, KUEUE_NAMESPACE, "spot-check").get("phase") and time.monotonic() < deadline:
            time.sleep(2)
        assert up.k("-n", namespace, "apply", "-f", "-", stdin=queue).returncode == 0
        late_job = demo_variant("late", namespace, className="queued", activeDeadlineSeconds=30)
        assert up.k("apply", "-f", "-", stdin=late_job).returncode == 0
        # Kueue refuses autoscaling RayJobs: so does the BatchInference, naming both fields, before any RayJob.
        scaling = demo_variant("scaling", namespace, scheduling={"queueName": "batch"})
        scaled = yaml.safe_load(scaling)
        scaled["spec"]["cluster"].update(enableInTreeAutoscaling=True)
        scaled["spec"]["cluster"]["workers"].update(maxReplicas=2)
        assert up.k("apply", "-f", "-", stdin=yaml.safe_dump(scaled)).returncode == 0
        output, _ = demo.communicate(timeout=1500)
    finally:
        done.set()
        watcher.join()
        rows = bis.stop()
    assert demo.returncode == 0, output[-4000:] + diagnosis(up, KUEUE_NAMESPACE)
    # The README's own output: catalog Running while spot-check is Queued (kubectl get bi -o wide), then both done.
    assert re.search(r"catalog\s+Running.*\n\s*spot-check\s+Queued\s+.*WaitingForKueue", output), output[-3000:]
    assert re.search(r"rayjob-catalog-\w+\s+batch\s+batch\s+True", output), output[-3000:]
    assert re.search(r"spot-check\s+Succeeded\s+16/16", output) and re.search(r"catalog\s+Succeeded\s+97/97", output)
    # spot-check's whole life as kubectl get bi showed it: queued, admitted (Pending), Running, Succeeded.
    assert bis.phases("spot-check") == ["Queued", "Pending", "Running", "Succeeded"], rows["spot-check"]
    assert bis.phases("catalog")[-2:] == ["Running", "Succeeded"], rows["catalog"]
    status = {name: bi_status(up, KUEUE_NAMESPACE, name) for name in ("catalog", "spot-check")}
    assert status["spot-check"]["startTime"] >= status["catalog"]["completionTime"], status  # one at a time
    said = [
        e["message"]
        for e in events(up, KUEUE_NAMESPACE)
        if e["reason"] == "Queued" and e["involvedObject"]["name"] == "spot-check"
    ]
    assert said and "Kueue" in said[0] and "LocalQueue 'batch'" in said[0], said
    # spec.suspend: true while queued (Kueue's webhook), then unsuspended by Kueue: the operator's only write to
    # a RayJob's spec is its create.
    for name in ("catalog", "spot-check"):  # catalog is admitted within a second: maybe never seen suspended
        states = [(suspend, writers) for rj, suspend, writers in suspends if rj == name]
        assert states[-1][0] is False and (name == "catalog" or states[0][0] is True), states
        created = json.loads(up.k("-n", KUEUE_NAMESPACE, "get", "rayjob", name, "-o", "json").stdout)["metadata"]
        assert all(writers.get("batchinfer-operator") == created["creationTimestamp"] for _, writers in states), states
        unsuspended = next(writers for suspend, writers in states if suspend is False)
        assert set(unsuspended) == {"batchinfer-operator", "kueue"}, unsuspended

    # The job whose class set the queue: queued behind both for minutes, yet its 30 s deadline did not run out
    # there; it counts from when the job ran, and so ends it then.
    try:
        done_late = wait_for(up, "late to end", lambda s: s.get("phase") in ("Succeeded", "Failed"), 900, namespace)
    finally:
        late_rows = late.stop()
    late_phases = late.phases("late")
    assert late_phases[:2] == ["Queued", "Pending"] and late_phases[-1] == "Failed", late_rows
    assert done_late["reason"] == "DeadlineExceeded", done_late
    assert done_late["completionTime"] >= status["spot-check"]["completionTime"], done_late  # failed once it ran
    rayjob = json.loads(up.k("-n", namespace, "get", "rayjob", "late", "-o", "json").stdout)
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "batch"
    workloads = json.loads(up.k("-n", namespace, "get", "workloads", "-o", "json").stdout)["items"]
    assert [w["status"]["admission"]["clusterQueue"] for w in workloads] == ["batch"], workloads
    created_at = json.loads(up.k("-n", namespace, "get", "bi", "late", "-o", "json").stdout)["metadata"]
    waited = seconds_between(created_at["creationTimestamp"], status["spot-check"]["completionTime"])
    assert waited > 2 * 30, waited  # queued twice as long as its deadline, and not failed for it
    scaling_status = bi_status(up, namespace, "scaling")
    assert scaling_status["phase"] == "Failed", scaling_status
    refusal = "scheduling.queueName and cluster.enableInTreeAutoscaling: true cannot go together"
    assert refusal in scaling_status["message"] and refusal in (REPO / "README.md").read_text()
    assert "scaling" not in up.k("-n", namespace, "get", "rayjobs", "-o", "name").stdout
    for gone in (namespace, KUEUE_NAMESPACE):
        assert up.k("delete", "namespace", gone, "--timeout=180s").returncode == 0
    assert up.k("delete", "-f", "manifests/samples/kueue/queues.yaml", "--ignore-not-found").returncode == 0
    assert up.k("delete", "bic", "queued").returncode == 0


def seconds_between(earlier: str, later: str) -> float:
    def parse(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))

    return parse(later) - parse(earlier)


def test_make_k8s_down_leaves_nothing(up: Node) -> None:
    for pid in [*up.pids.values(), *up.node_pids.values()]:  # every listener on loopback or the node's address
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                assert conn.laddr.ip in ("127.0.0.1", node.GATEWAY), conn
    down = make("k8s-down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: etcd, kube-apiserver, kube-controller-manager, s3, containerd" in down.stdout
    # processes, mounts, links, iptables rules, namespaces, cgroups, sysctls, the kubelet's fixed paths
    assert node.leftovers(FOLDER, [*up.pids.values(), *up.node_pids.values()]) == []
