"""Prometheus metrics of the operator, served on /metrics when a port is configured."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

PHASES = ("Pending", "Queued", "Running", "Retrying", "Succeeded", "Failed", "Suspended")

RECONCILES = Counter("batchinfer_reconciles_total", "Handler invocations.", ["handler"])
ERRORS = Counter("batchinfer_reconcile_errors_total", "Handler invocations that raised.", ["handler"])
CHILDREN_CREATED = Counter("batchinfer_children_created_total", "Child objects created.", ["kind"])
DEFAULT_CLASSES = Gauge("batchinfer_default_classes", "BatchInferenceClasses marked default (over 1: none used).")


class PhaseCollector(Collector):
    """BatchInferences by phase, from what the operator last saw of each."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}

    def observe(self, namespace: str, name: str, phase: str | None) -> None:
        self.phases[(namespace, name)] = phase or "Pending"

    def forget(self, namespace: str, name: str) -> None:
        self.phases.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("batchinfer_batchinferences", "BatchInferences by phase.", labels=["phase"])
        values = list(self.phases.values())
        for phase in PHASES:
            family.add_metric([phase], values.count(phase))
        yield family


PHASE_COLLECTOR = PhaseCollector()
REGISTRY.register(PHASE_COLLECTOR)


def serve(port: int, address: str) -> None:
    start_http_server(port, addr=address)
