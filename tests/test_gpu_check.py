"""A GPU pod whose driver is older than torch's CUDA: the model actor fails at once with one line that names
the driver, torch's CUDA and the fix, instead of `device: auto` quietly running on the CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from batchinfer_job.demo_data import write_demo_images
from batchinfer_job.gpu_check import MIN_DRIVER, driver_version, gpu_problem

PROC_TEXT = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)


def test_the_drivers_version_is_read_from_proc() -> None:
    assert driver_version(PROC_TEXT) == "550.54.14"
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder)"
    assert driver_version(open_module) == "580.65.06"
    assert driver_version("") is None and driver_version(None) is None


def test_an_old_driver_is_named_with_torchs_cuda_and_the_fix() -> None:
    problem = gpu_problem(["0"], False, "2.14.1+cu130", "13.0", "550.54.14")
    assert problem is not None and "\n" not in problem
    for words in ("GPU 0", "torch 2.14.1+cu130", "CUDA 13.0", ">= 580.65.06", "driver is 550.54.14", "cu128"):
        assert words in problem, words


def test_usable_or_unassigned_gpus_are_no_problem() -> None:
    assert gpu_problem(["0"], True, "2.14.1+cu130", "13.0", "580.65.06") is None
    assert gpu_problem([], False, "2.14.1+cu130", "13.0", None) is None  # a CPU actor
    assert "CPU-only build" in (gpu_problem(["1"], False, "2.14.1+cpu", None, "580.65.06") or "")
    assert "no NVIDIA driver is visible" in (gpu_problem(["0"], False, "2.14.1", "13.0", None) or "")


RUN_WITH_A_GPU_TORCH_CANNOT_USE = """
import json, sys
from batchinfer_job.local import LOCAL_RAY_ENV
import os
for key, value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(key, value)
import ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")  # a GPU torch cannot see
from batchinfer_job.documents import parse_spec
from batchinfer_job.pipeline import run_pipeline
run_pipeline(parse_spec(json.loads(sys.argv[1])), on_progress=None)
"""


def test_a_model_actor_given_a_gpu_torch_cannot_use_fails_the_job_in_one_line(tmp_path: Path) -> None:
    """Ray told it has a GPU this machine lacks: Ray assigns it to the actor, as on a node whose driver torch's
    CUDA cannot use. Before, `device: auto` ran the model on the CPU and the job succeeded."""
    write_demo_images(tmp_path / "in", per_photo=1)
    spec = {
        "model": {"packaged": "efficientnet_lite0"},
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(tmp_path / "out")},
        "compute": {"device": "auto", "gpusPerActor": 1, "cpusPerActor": 1, "minActors": 1, "maxActors": 1},
        "timeouts": {"stallSeconds": 300},
    }
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITH_A_GPU_TORCH_CANNOT_USE, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    prefix = "batchinfer_job.pipeline.ModelActorStartError: a model actor failed to start: "
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith(prefix)]  # Ray's worker logs interleave
    assert "GpuUnusableError: Ray gave this model actor GPU 0, but torch" in line and "NVIDIA driver" in line
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()


def test_the_job_image_holds_one_cuda_and_the_readme_names_the_driver_it_needs() -> None:
    """The base image carries no CUDA of another major than torch's (the lock's CUDA runtime wheels), and the
    README states the driver that CUDA needs."""
    runtime = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)", Path("requirements.lock").read_text(), re.M)
    assert runtime, "requirements.lock pins no CUDA runtime wheel"
    major, cuda = runtime.group(1), f"{runtime.group(1)}.{runtime.group(2)}"
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", Path("job_image/Dockerfile").read_text(), re.M)
    assert base, "job_image/Dockerfile has no ARG BASE_IMAGE default"
    base_cuda = re.search(r"-cu(\d+)", base.group(1))
    assert base_cuda is None or base_cuda.group(1).startswith(major), (base.group(1), cuda)
    assert f"NVIDIA driver {MIN_DRIVER[cuda].split('.')[0]} or newer" in Path("README.md").read_text()
