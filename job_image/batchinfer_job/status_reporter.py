"""Progress from the running job into its own `BatchInference.status.progress`.

The operator binds the job's ServiceAccount to a Role that allows `get`/`patch` on this one object's
status subresource, nothing else. Reports are throttled; the final one always goes out.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from batchinfer_job import spec as s
from batchinfer_job.progress import ProgressReport

log = logging.getLogger("batchinfer.progress")
DEFAULT_INTERVAL = 10.0  # the issue asks for at least every 30 s


@dataclass
class StatusReporter:
    namespace: str
    name: str
    api: Any
    interval: float = DEFAULT_INTERVAL
    _last: float = field(default=float("-inf"), init=False)

    @classmethod
    def in_cluster(cls) -> StatusReporter | None:
        """A reporter for the BatchInference named in the pod's environment, or None outside a cluster.

        Also None, said once in the log, when the pod cannot reach the API server as its ServiceAccount (a
        ServiceAccount with automountServiceAccountToken: false mounts no token): the job runs all the same;
        only `kubectl get bi` shows no progress until it ends.
        """
        name, namespace = os.environ.get("BATCHINFER_NAME"), os.environ.get("BATCHINFER_NAMESPACE")
        if not (name and namespace):
            return None
        import kubernetes

        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException as err:
            log.warning(
                "progress is not reported to BatchInference %s/%s: %s (the pod's ServiceAccount token is not "
                "mounted; give the Ray pods an account with automountServiceAccountToken, or accept no live "
                "progress); the job runs on",
                namespace,
                name,
                err,
            )
            return None
        return cls(namespace=namespace, name=name, api=kubernetes.client.CustomObjectsApi())

    def __call__(self, report: ProgressReport, final: bool = False) -> None:
        if not final and time.monotonic() - self._last < self.interval and not report.finished:
            return
        self._last = time.monotonic()
        body = {"status": {"progress": report.as_status()}}
        try:
            self.api.patch_namespaced_custom_object_status(
                s.API_GROUP, s.API_VERSION, self.namespace, s.PLURAL, self.name, body
            )
        except Exception as err:
            log.warning("progress_patch_failed name=%s namespace=%s error=%r", self.name, self.namespace, err)
