"""The cluster's S3: moto's S3 API server on the node's address, where both this machine and the pods reach
it, with a `demo` bucket; and `env`, the shell lines that point kubectl and the AWS tools at the cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.controlplane.host import GATEWAY
from tests.controlplane.processes import spawn, wait_ready

S3_PORT = 9000
S3_ENDPOINT = f"http://{GATEWAY}:{S3_PORT}"  # the same address from the host and from pods (no NAT here)
DEMO_BUCKET = "demo"
# moto accepts any key; these are what the env file and the samples' Secret carry.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "batchinfer-local",
    "AWS_SECRET_ACCESS_KEY": "batchinfer-local-secret",
    "AWS_REGION": "us-east-1",
}
ENV_FILE = "env"


def start(folder: Path, timeout: float) -> subprocess.Popen:
    """moto on GATEWAY:S3_PORT (the bridge must be up) with the demo bucket; returns the process."""
    moto = Path(sys.executable).parent / "moto_server"
    process = spawn("s3", [str(moto), "-H", GATEWAY, "-p", str(S3_PORT)], folder)
    wait_ready("s3", process, folder, _answers, timeout)
    import boto3

    boto3.client("s3", endpoint_url=S3_ENDPOINT, **_boto_credentials()).create_bucket(Bucket=DEMO_BUCKET)
    return process


def _answers() -> bool:
    import urllib.request

    with urllib.request.urlopen(f"{S3_ENDPOINT}/moto-api/", timeout=2) as response:
        return response.status == 200


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_REGION"],
    }


def environment(kubeconfig: Path) -> dict[str, str]:
    """What `source build/k8s/env` exports: kubectl's cluster and the S3 every tool here and in pods uses."""
    return {
        "KUBECONFIG": str(kubeconfig),
        "AWS_ENDPOINT_URL": S3_ENDPOINT,
        "BATCHINFER_S3_ENDPOINT_IN_CLUSTER": S3_ENDPOINT,
        **CREDENTIALS,
    }


def write_env(folder: Path, kubeconfig: Path) -> Path:
    lines = [
        "# Written by `make k8s-up`: `source` it to reach this cluster and its S3 (moto, bucket `demo`).",
        *(f"export {key}={value}" for key, value in environment(kubeconfig).items()),
    ]
    path = folder / ENV_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
