"""Predictors that misbehave on purpose, to exercise (and let users reproduce) failure handling.

A *marked* image is solid magenta. `PoisonedPredictor` raises on batches holding one, `HangingPredictor`
hangs on them, `SlowPredictor` is slow on every batch. Otherwise they answer like
`DominantChannelPredictor`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from batchinfer_job.examples import DominantChannelPredictor

MARK = (255, 0, 255)


def is_marked(image: np.ndarray) -> bool:
    r, g, b = image.reshape(-1, 3).mean(axis=0)
    return r > 240 and g < 15 and b > 240


class PoisonedPredictor(DominantChannelPredictor):
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if any(is_marked(image) for image in batch["image"]):
            raise ValueError("poisoned row in batch")
        return super().__call__(batch)


class HangingPredictor(DominantChannelPredictor):
    """Hangs for $BATCHINFER_HANG_SECONDS (default 30) on batches with a marked image."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if any(is_marked(image) for image in batch["image"]):
            time.sleep(float(os.environ.get("BATCHINFER_HANG_SECONDS", "30")))
        return super().__call__(batch)


class SlowPredictor(DominantChannelPredictor):
    """Takes $BATCHINFER_SLOW_SECONDS (default 0.5) per batch."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        time.sleep(float(os.environ.get("BATCHINFER_SLOW_SECONDS", "0.5")))
        return super().__call__(batch)


class OutOfMemoryPredictor(DominantChannelPredictor):
    """Raises the device out-of-memory error on calls of more than $BATCHINFER_OOM_ABOVE rows (default 4),
    as a GPU does when a batch does not fit; counts the rows of each call in `calls`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        self.calls.append(len(batch["image"]))
        limit = int(os.environ.get("BATCHINFER_OOM_ABOVE", "4"))
        if len(batch["image"]) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(batch['image'])} rows (fits {limit})")
        return super().__call__(batch)


class WrongTypePredictor(DominantChannelPredictor):
    """Breaks the contract: returns a list instead of a dict."""

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        return [1, 2, 3]


class WrongShapePredictor(DominantChannelPredictor):
    """Breaks the contract: one row fewer than it was given."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = super().__call__(batch)
        return {**out, "top_k_classes": out["top_k_classes"][1:], "top_k_scores": out["top_k_scores"][1:]}


class UnconstructiblePredictor:
    """Breaks the contract: cannot be built."""

    def __init__(self) -> None:
        raise RuntimeError("no model here")
