"""Out-of-memory back-off inside one model actor, without Ray: halve, retry the same rows, keep the size."""

from __future__ import annotations

import numpy as np
import pytest

from batchinfer_job.predictor import PredictorConfig, TorchPredictor

OOM = "batchinfer_job.fault_predictors:OutOfMemoryPredictor"


def batch(rows: int, start: int = 0) -> dict[str, np.ndarray]:
    images = np.zeros((rows, 8, 8, 3), np.uint8)
    images[:, :, :, 0] = 200  # red dominates
    keys = np.asarray([f"k{start + i}" for i in range(rows)], dtype=object)
    return {"key": keys, "image": images, "error": np.asarray([""] * rows, dtype=object)}


@pytest.fixture
def actor(monkeypatch: pytest.MonkeyPatch) -> TorchPredictor:
    monkeypatch.setenv("BATCHINFER_OOM_ABOVE", "5")
    return TorchPredictor(PredictorConfig(model={"predictor": OOM}, device="cpu"))


def test_a_batch_too_big_for_the_device_is_halved_and_every_row_predicted(actor: TorchPredictor) -> None:
    table = actor(batch(16))
    assert table.num_rows == 16 and table["error"].null_count == 16  # no error in any row
    assert table["label"].to_pylist() == ["red"] * 16
    assert actor.user_predictor.calls == [16, 8, 4, 4, 4, 4]  # type: ignore[union-attr]
    assert actor.max_rows == 4


def test_the_smaller_size_is_kept_for_later_batches(actor: TorchPredictor) -> None:
    actor(batch(16))
    calls = actor.user_predictor.calls  # type: ignore[union-attr]
    calls.clear()
    assert actor(batch(10, start=16)).num_rows == 10
    assert calls == [4, 4, 2]  # straight to the learned size: no failed call of 10 first


def test_a_row_that_does_not_fit_even_alone_becomes_an_error_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATCHINFER_OOM_ABOVE", "0")
    actor = TorchPredictor(PredictorConfig(model={"predictor": OOM}, device="cpu"))
    table = actor(batch(3))
    errors = table["error"].to_pylist()
    assert all(e.startswith("predict: OutOfMemoryError: CUDA out of memory") for e in errors)


def test_a_poisoned_row_is_still_isolated_and_not_taken_for_memory() -> None:
    """Other RuntimeErrors keep the split-until-single path; they never shrink the call size."""
    from batchinfer_job.fault_predictors import PoisonedPredictor

    poisoned = TorchPredictor(PredictorConfig(model={"predictor": "batchinfer_job.fault_predictors:PoisonedPredictor"}))
    data = batch(8)
    data["image"][3] = (255, 0, 255)
    table = poisoned(data)
    assert table["error"].to_pylist()[3] == "predict: ValueError: poisoned row in batch"
    assert poisoned.max_rows is None and isinstance(poisoned.user_predictor, PoisonedPredictor)


def test_rows_decoded_in_the_actor_back_off_the_same_way(actor: TorchPredictor, photo_dir) -> None:
    """compute.decode=device: the batch arrives as bytes, is decoded into a tensor, then halved on OOM."""
    from batchinfer_job.decode import fetch_batch

    paths = sorted(p for p in photo_dir.iterdir() if p.name.startswith(("chelsea", "coffee")))[:12]
    names = np.asarray([str(p) for p in paths], dtype=object)
    table = actor(fetch_batch({"key": names, "uri": names}))
    assert sorted(table["key"].to_pylist()) == sorted(names) and table["error"].null_count == 12
    assert actor.user_predictor.calls == [12, 6, 3, 3, 3, 3]  # type: ignore[union-attr]
