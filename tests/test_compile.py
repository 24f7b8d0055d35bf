"""compute.optimize=compile and auto's choice of it: compiled beside the eager model, which serves meanwhile.

On this CPU with a small stand-in model (torch.compile of a real network takes minutes on two cores): the actor
is ready before the compile ends, batches keep being predicted eagerly until it does, then go to the compiled
model — padded to the one shape it was compiled for, so it never recompiles — with the same results.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from batchinfer_job import inputs, predictor
from batchinfer_job.inputs import Partition
from batchinfer_job.models import LoadedModel
from batchinfer_job.pipeline import ReadPlan, rows_left_at_least
from batchinfer_job.predictor import COMPILE_MIN_ROWS_PER_ACTOR, PredictorConfig, TorchPredictor, resolve_optimize

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("mode", "device", "dtype", "rows", "expected"),
    [
        ("auto", CPU, torch.float32, 10**9, "torchscript"),
        ("auto", CPU, torch.bfloat16, 10**9, "eager"),
        ("auto", CUDA, torch.bfloat16, None, "eager"),  # rows not known from the plan
        ("auto", CUDA, torch.bfloat16, COMPILE_MIN_ROWS_PER_ACTOR - 1, "eager"),
        ("auto", CUDA, torch.bfloat16, COMPILE_MIN_ROWS_PER_ACTOR, "compile"),
        ("eager", CUDA, torch.bfloat16, 10**9, "eager"),
        ("compile", CPU, torch.float32, 1, "compile"),
    ],
)
def test_auto_compiles_on_a_gpu_only_for_jobs_long_enough_to_repay_it(mode, device, dtype, rows, expected) -> None:
    assert resolve_optimize(mode, device, dtype, rows) == expected


def test_the_plan_counts_listed_files_and_less_what_is_committed() -> None:
    pages = [
        Partition("p0", "files", "s3://b/in", ("a", "b", "c")),
        Partition("p1", "files", "s3://b/in", ("d",) * 5, cap=2),
    ]
    unknown = [Partition("f/", "prefix", "s3://b/in/f"), Partition("x.parquet", "parquet", "s3://b/x.parquet")]
    assert inputs.rows_at_least(pages + unknown) == 5
    plan = ReadPlan(pages + unknown, {"p0": [["s3://b/out/shard-0", 0, 2]]}, ledger=None)
    assert rows_left_at_least(plan) == 3


class Tiny(torch.nn.Module):
    """A stand-in classifier that compiles in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = Tiny().eval()
    monkeypatch.setattr(predictor, "load_model", lambda spec: LoadedModel(module, [f"c{i}" for i in range(10)]))


@pytest.mark.usefixtures("tiny")
def test_the_compile_runs_beside_the_eager_model_and_never_recompiles() -> None:
    config = PredictorConfig(
        model={"torchvision": {"name": "resnet18", "weights": "NONE"}}, device="cpu", optimize="compile", batch_rows=4
    )
    eager = TorchPredictor(PredictorConfig(model=config.model, device="cpu", optimize="eager"))
    actor = TorchPredictor(config)
    images = np.random.default_rng(0).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    assert actor.optimized == "compile" and actor.compiled is None  # ready, and the compile still running
    during = actor.predict_uint8(images[:3])  # served by the eager model meanwhile
    compiled = actor.wait_compiled(timeout=300)
    assert compiled is not None and compiled.rows == 4
    graphs, shapes = counters["stats"]["unique_graphs"], []

    def recording(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return compiled.model(x)

    actor.compiled = replace(compiled, model=recording)
    for rows in (1, 3, 4, 5):  # 1-4 on the compiled model (padded to 4), 5 eager
        classes, scores = actor.predict_uint8(images[:rows])
        want_classes, want_scores = eager.predict_uint8(images[:rows])
        assert np.array_equal(classes, want_classes) and np.allclose(scores, want_scores, atol=1e-4), rows
    assert shapes == [(4, 3, 224, 224)] * 3  # rows 1, 3 and 4, padded; 5 went to the eager model
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile for any call size
    assert np.array_equal(during[0], eager.predict_uint8(images[:3])[0])
