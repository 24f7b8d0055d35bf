"""Every precision/optimisation switch gives the fp32 top-1 on the sample photos (within a tolerance for the
half-precision ones). CUDA variants join when a GPU is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from batchinfer_job.decode import decode_batch
from batchinfer_job.models import preprocess_for
from batchinfer_job.predictor import PredictorConfig, TorchPredictor
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


def test_auto_picks_torchscript_fp32_on_cpu() -> None:
    predictor = TorchPredictor(PredictorConfig(model=MODEL, device="cpu"))
    assert (predictor.dtype, predictor.optimized) == (torch.float32, "torchscript")
