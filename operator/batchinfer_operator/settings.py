"""Operator settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_JOB_IMAGE = "ghcr.io/batchinfer/batchinfer-job:0.1.0"
DEFAULT_RAY_VERSION = "2.60.0"


@dataclass(frozen=True)
class OperatorSettings:
    job_image: str = DEFAULT_JOB_IMAGE
    ray_version: str = DEFAULT_RAY_VERSION
    image_pull_policy: str = "IfNotPresent"
    metrics_port: int = 0  # 0: no /metrics server (tests); the chart sets 8081
    metrics_address: str = "0.0.0.0"
    resync_seconds: float = 60.0  # how often unfinished BatchInferences are reconciled from their RayJob

    @classmethod
    def from_env(cls) -> OperatorSettings:
        return cls(
            job_image=os.environ.get("BATCHINFER_JOB_IMAGE", DEFAULT_JOB_IMAGE),
            ray_version=os.environ.get("BATCHINFER_RAY_VERSION", DEFAULT_RAY_VERSION),
            image_pull_policy=os.environ.get("BATCHINFER_IMAGE_PULL_POLICY", "IfNotPresent"),
            metrics_port=int(os.environ.get("BATCHINFER_METRICS_PORT", "0")),
            metrics_address=os.environ.get("BATCHINFER_METRICS_ADDRESS", "0.0.0.0"),
            resync_seconds=float(os.environ.get("BATCHINFER_RESYNC_SECONDS", "60")),
        )
