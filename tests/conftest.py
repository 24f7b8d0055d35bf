"""Shared fixtures: a real S3 API (moto server), an embedded Ray, sample photos. All on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from batchinfer_job.bench.commit_bench import moto_server
from batchinfer_job.demo_data import write_demo_images, write_truncated
from batchinfer_job.local import LOCAL_RAY_ENV
from tests.operator_env import k8s, namespace, operator  # noqa: F401  (operator-test fixtures)

for _key, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_key, _value)
# The operator's resync timer (read when its handlers are imported): seconds here, a minute by default.
os.environ.setdefault("BATCHINFER_RESYNC_SECONDS", "4")
logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per emulator request is noise

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto in server mode on loopback; the AWS environment points at it (before Ray starts, so workers
    inherit it)."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3(s3_server: str):
    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture
def bucket(s3) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def local_ray(s3_server: str) -> Iterator[None]:
    """One embedded Ray for the session, bound to loopback (started after S3 so workers see its env)."""
    import ray

    from batchinfer_job.local import start_local_ray

    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos (6 variants of each of 4 photos), one corrupt and one truncated file."""
    folder = tmp_path_factory.mktemp("photos")
    written = write_demo_images(folder, per_photo=6, photos=("chelsea", "coffee", "rocket", "astronaut"))
    write_truncated(next(p for p in written if p.name == "chelsea_001.jpg"), folder / "truncated_000.jpg")
    return folder


BROKEN = {"corrupt_000.jpg", "truncated_000.jpg"}
from tests.controlplane.fixtures import (  # noqa: E402, F401  (real control-plane fixtures)
    cluster,
    cluster_namespace,
    control_plane,
    operator_kubeconfig,
    real_operator,
)
