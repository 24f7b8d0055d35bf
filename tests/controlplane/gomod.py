"""What `build.sh` pins (versions.env) and where Go keeps a pinned module's files (its module cache)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.controlplane.host import NodeError

VERSIONS = Path(__file__).resolve().parent / "versions.env"


def pinned(key: str) -> str:
    """The value of `key` (e.g. KUBERAY_VERSION) in versions.env."""
    for line in VERSIONS.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    raise NodeError(f"{VERSIONS} pins no {key}")


def module_dir(module: str) -> Path:
    """The folder of `module` (path@version) in Go's module cache (go mod download: fetched if missing)."""
    got = subprocess.run(
        ["go", "mod", "download", "-json", module],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        env={**os.environ, "GOFLAGS": "-mod=mod"},
    )
    if got.returncode != 0:
        raise NodeError(f"go mod download {module} failed: {got.stderr.strip() or got.stdout.strip()}")
    return Path(json.loads(got.stdout)["Dir"])
