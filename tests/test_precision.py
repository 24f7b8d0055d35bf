"""Every precision/optimisation switch gives the fp32 top-1 on the sample photos (within a tolerance for the
half-precision ones). CUDA variants join when a GPU is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from batchinfer_job.decode import decode_batch
from batchinfer_job.models import preprocess_for
from batchinfer_job.predictor import PredictorConfig, TorchPredictor, pick_dtype
from batchinfer_job.spec import ModelSpec
from tests.conftest import BROKEN

MODEL = {"packaged": "efficientnet_lite0"}
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
VARIANTS = [
    (device, precision, optimize, exact)
    for device in DEVICES
    for precision, optimize, exact in [
        ("fp32", "eager", True),
        ("fp32", "torchscript", True),
        ("bf16", "eager", False),
        ("fp16", "eager", False),
        ("bf16", "torchscript", False),
    ]
]


@pytest.fixture(scope="module")
def images(photo_dir: Path) -> np.ndarray:
    paths = sorted(str(p) for p in photo_dir.iterdir() if p.name not in BROKEN)
    batch = {"key": np.asarray(paths, dtype=object), "uri": np.asarray(paths, dtype=object)}
    return decode_batch(batch, preprocess=preprocess_for(ModelSpec.model_validate(MODEL)))["image"]


@pytest.fixture(scope="module")
def reference(images: np.ndarray) -> np.ndarray:
    predictor = TorchPredictor(
        PredictorConfig(model=MODEL, device="cpu", precision="fp32", optimize="eager", threads=2)
    )
    return predictor.predict_uint8(images)[0][:, 0]


@pytest.mark.parametrize(("device", "precision", "optimize", "exact"), VARIANTS, ids=lambda v: str(v))
def test_switch_keeps_fp32_top1(images, reference, device, precision, optimize, exact) -> None:
    config = PredictorConfig(model=MODEL, device=device, precision=precision, optimize=optimize, threads=2)
    predictor = TorchPredictor(config)
    top1 = predictor.predict_uint8(images)[0][:, 0]
    agreement = float(np.mean(top1 == reference))
    assert agreement == 1.0 if exact else agreement >= 0.9, (agreement, predictor.optimized)


@pytest.mark.parametrize(
    ("device", "cuda_bf16", "cpu_amx", "expected"),
    [
        ("cpu", False, False, torch.float32),
        ("cpu", False, True, torch.bfloat16),
        ("cpu", True, False, torch.float32),  # a GPU's bf16 says nothing about the CPU
        ("cuda", True, False, torch.bfloat16),
        ("cuda", False, True, torch.float32),  # nor the CPU's AMX about the GPU
    ],
)
def test_auto_precision_is_bf16_only_where_the_hardware_runs_it(device, cuda_bf16, cpu_amx, expected) -> None:
    assert pick_dtype("auto", torch.device(device), cuda_bf16=cuda_bf16, cpu_amx=cpu_amx) == expected
    assert pick_dtype("fp32", torch.device(device), cuda_bf16=True, cpu_amx=True) == torch.float32


def test_auto_on_this_cpu_follows_its_amx_flag() -> None:
    """bf16 eager on a CPU with AMX (read from /proc/cpuinfo, not from torch), else frozen TorchScript in fp32."""
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    predictor = TorchPredictor(PredictorConfig(model=MODEL, device="cpu"))
    expected = (torch.bfloat16, "eager") if amx else (torch.float32, "torchscript")
    assert (predictor.dtype, predictor.optimized) == expected
