"""Operator at scale (a benchmark, not a test): N BatchInferences against the real control plane.

`make bench-operator` (N=1000): starts a fresh control plane in build/k8s-bench, runs the operator as the
chart does (its own process, the chart's RBAC), creates N BatchInferences one after another and reports
the operator's peak RSS, p50/p99 time from a create call to its RayJob appearing (seen through a watch),
and the time until every BatchInference has its RayJob and a phase. The real KubeRay operator runs too, so
each RayJob also becomes a RayCluster and pods: the API server carries the whole load.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import psutil
from kubernetes import client, config, watch

from batchinfer_job import spec as s
from tests.controlplane.cluster import REPO, start, stop
from tests.controlplane.fixtures import Cluster, OperatorProcess, operator_credentials
from tests.helpers import eventually

NAMESPACE = "scale"


def body(index: int) -> dict:
    return {
        "apiVersion": f"{s.API_GROUP}/{s.API_VERSION}",
        "kind": s.KIND,
        "metadata": {"name": f"bi-{index:05d}"},
        "spec": {
            "model": {"packaged": "efficientnet_lite0"},
            "input": {"uri": f"s3://inputs/part-{index:05d}/"},
            "output": {"uri": f"s3://outputs/part-{index:05d}/"},
        },
    }


class PeakRss(threading.Thread):
    """Samples a process's resident memory every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process, self.peak, self.running = psutil.Process(pid), 0, True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)


def watch_rayjobs(api: client.ApiClient, seen: dict[str, float], stop_flag: threading.Event) -> None:
    custom = client.CustomObjectsApi(api)
    while not stop_flag.is_set():
        stream = watch.Watch().stream(
            custom.list_namespaced_custom_object, "ray.io", "v1", NAMESPACE, "rayjobs", timeout_seconds=5
        )
        for event in stream:
            seen.setdefault(event["object"]["metadata"]["name"], time.monotonic())


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(count: int, folder: Path, rate: float = 0) -> list[str]:
    plane = start(folder)
    operator: OperatorProcess | None = None
    try:
        admin = Cluster(config.new_client_from_config(str(plane.kubeconfig)))
        operator = OperatorProcess(operator_credentials(plane, admin), folder / "operator.log")
        rss = PeakRss(operator.process.pid)
        rss.start()
        admin.core.create_namespace({"metadata": {"name": NAMESPACE}})
        seen: dict[str, float] = {}
        stop_flag = threading.Event()
        watcher = threading.Thread(
            target=watch_rayjobs,
            args=(config.new_client_from_config(str(plane.kubeconfig)), seen, stop_flag),
            daemon=True,
        )
        watcher.start()
        created: dict[str, float] = {}
        began = time.monotonic()
        for index in range(count):
            if rate:  # paced: the index-th create is due index/rate seconds after the first
                time.sleep(max(0.0, began + index / rate - time.monotonic()))
            document = body(index)
            created[document["metadata"]["name"]] = time.monotonic()
            admin.create_bi(NAMESPACE, document)
        created_in = time.monotonic() - began

        def all_reconciled() -> bool:
            items = admin.custom.list_namespaced_custom_object(s.API_GROUP, s.API_VERSION, NAMESPACE, s.PLURAL)["items"]
            done = sum(1 for i in items if (i.get("status") or {}).get("rayJobName") and i["status"].get("phase"))
            return done == count and len(seen) >= count

        eventually(all_reconciled, 60 + count, f"{count} BatchInferences reconciled")
        total = time.monotonic() - began
        stop_flag.set()
        rss.running = False
        latencies = [seen[name] - created[name] for name in created if name in seen]
        cpu = {
            name: cpu_seconds(pid) for name, pid in {**plane.pids, "batchinfer-operator": operator.process.pid}.items()
        }
        operator.stop()
        return [
            f"batchinferences={count} created_in={created_in:.1f}s (one client, "
            + (f"paced at {rate:g}/s)" if rate else "as fast as it can)"),
            f"create_to_rayjob p50={percentile(latencies, 50):.2f}s p99={percentile(latencies, 99):.2f}s "
            f"max={max(latencies):.2f}s",
            f"all_reconciled_after={total:.1f}s",
            f"operator_peak_rss={rss.peak / 2**20:.0f}MiB",
            "cpu_seconds " + " ".join(f"{name}={seconds:.0f}" for name, seconds in cpu.items()),
        ]
    finally:
        if operator is not None:
            operator.stop()  # also when something above failed: never leave an operator running
        stop(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0, help="creates per second (0: as fast as possible)")
    parser.add_argument("--folder", type=Path, default=REPO / "build" / "k8s-bench")
    args = parser.parse_args()
    for line in run(args.count, args.folder.resolve(), args.rate):
        print(line, flush=True)


if __name__ == "__main__":
    main()
