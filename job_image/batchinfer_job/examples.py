"""A minimal bring-your-own predictor, showing the `model.predictor: "module:Class"` contract.

`DominantChannelPredictor` labels an image by its strongest colour channel. Real predictors load a model in
`__init__` (once per actor) and run it in `__call__`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np


class DominantChannelPredictor:
    categories: ClassVar[list[str]] = ["red", "green", "blue"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        means = batch["image"].reshape(len(batch["image"]), -1, 3).mean(axis=1)  # (N, 3)
        probs = means / np.maximum(means.sum(axis=1, keepdims=True), 1e-9)
        order = np.argsort(-probs, axis=1)
        return {
            "top_k_classes": order,
            "top_k_scores": np.take_along_axis(probs, order, axis=1),
            "categories": self.categories,
        }
