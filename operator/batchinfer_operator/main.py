"""Operator entry module: kopf settings, the API client, metrics; imports the handlers.

Run: `kopf run -m batchinfer_operator.main --all-namespaces --liveness=http://0.0.0.0:8080/healthz`
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import kopf

from batchinfer_operator import kube, metrics
from batchinfer_operator.handlers import batchinference, classes, rayjob  # noqa: F401  (registers handlers)
from batchinfer_operator.settings import OperatorSettings

PREFIX = "batchinfer.dev"
HANDLER_THREADS = 32


def peering_priority(pod_name: str) -> int:
    """A priority in [1, 10**6) derived from the pod name (two pods collide with odds of about 1e-6)."""
    return 1 + int(hashlib.sha256(pod_name.encode()).hexdigest()[:12], 16) % (10**6 - 1)


@kopf.on.startup()  # type: ignore[arg-type]  # kopf's protocol lists every keyword; this takes **_
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    # Our own annotation prefix: kopf's progress and diff-base never land in status (the CRD would prune).
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    # Handlers call the (blocking) kubernetes client; kopf runs them in a thread pool that defaults to a few
    # threads per core, so a burst of new BatchInferences queues behind a handful of API round trips.
    settings.execution.max_workers = HANDLER_THREADS
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.peering.name = "batchinfer"
    # kopf pauses *all* peers that share a priority: give each pod its own, stable for the pod's life.
    settings.peering.priority = peering_priority(os.environ.get("POD_NAME", ""))
    kube.configure_client()
    config = OperatorSettings.from_env()
    if config.metrics_port:
        metrics.serve(config.metrics_port, config.metrics_address)
        logger.info(f"metrics on {config.metrics_address}:{config.metrics_port}/metrics")
