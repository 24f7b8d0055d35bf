"""Refuse to run on the CPU in a pod Ray gave GPUs: name the node's driver, torch's CUDA and the fix.

torch's wheels carry their own CUDA runtime, which needs an NVIDIA driver at least as new as that CUDA
(`MIN_DRIVER`). On an older driver `torch.cuda.is_available()` is False, and `device: auto` would quietly run
the model on the CPU of a GPU pod. `gpu_problem` is pure; `check_assigned_gpus` reads the process's state.
"""

from __future__ import annotations

import re
from pathlib import Path

from batchinfer_job.models import ModelLoadError

# Smallest Linux driver each CUDA (major.minor) needs (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {"13.0": "580.65.06", "12.9": "575.51.03", "12.8": "570.26", "12.6": "560.28.03", "12.4": "550.54.14"}
DRIVER_FILE = Path("/proc/driver/nvidia/version")
CU128_HINT = "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"


class GpuUnusableError(ModelLoadError):
    """Ray assigned this actor GPUs that torch cannot use."""


def driver_version(text: str | None) -> str | None:
    """The kernel module's version from /proc/driver/nvidia/version, e.g. '550.54.14'."""
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9]+(?:\.[0-9]+)+)", text or "")
    return found.group(1) if found else None


def gpu_problem(
    gpu_ids: list[str], cuda_available: bool, torch_version: str, torch_cuda: str | None, driver: str | None
) -> str | None:
    """Why the GPUs Ray assigned cannot be used (one line), or None when they can (or none were assigned)."""
    if not gpu_ids or cuda_available:
        return None
    given = f"Ray gave this model actor GPU {', '.join(gpu_ids)}, but torch {torch_version} cannot use it"
    if torch_cuda is None:
        return f"{given}: this torch is a CPU-only build; install a CUDA build of torch in the job image"
    needed = MIN_DRIVER.get(".".join(torch_cuda.split(".")[:2]))
    needs = f"CUDA {torch_cuda}, which needs NVIDIA driver >= {needed}" if needed else f"CUDA {torch_cuda}"
    if driver is None:
        return (
            f"{given}: it was built for {needs}, and no NVIDIA driver is visible in the pod "
            f"({DRIVER_FILE} is missing): check the node's GPU operator / device plugin and the runtime class"
        )
    return (
        f"{given}: it was built for {needs}; the node's driver is {driver}. Upgrade the node's driver, or build "
        f"the job image for the node's CUDA (e.g. docker build {CU128_HINT} for driver >= {MIN_DRIVER['12.8']})"
    )


def check_assigned_gpus() -> None:
    """Raise GpuUnusableError when Ray assigned this process GPUs that torch cannot use."""
    import ray
    import torch

    gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    try:
        driver = driver_version(DRIVER_FILE.read_text())
    except OSError:
        driver = None
    problem = gpu_problem(gpu_ids, torch.cuda.is_available(), torch.__version__, torch.version.cuda, driver)
    if problem:
        raise GpuUnusableError(problem)
