"""GPU/CPU stage: the actor class Ray Data's actor pool runs. Loads the model once, predicts per batch.

Input batch (from decode): `key`, `image` uint8 (N, H, W, 3), `error`. Output: a `PREDICTION_SCHEMA` table.
uint8 travels to the device (pinned, non-blocking) and is normalised there; rows whose model call raises
are isolated by splitting the batch, so one poisoned row costs only itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from batchinfer_job.decode import error_or_none
from batchinfer_job.models import load_model, preprocess_for
from batchinfer_job.outputs import prediction_table
from batchinfer_job.spec import ModelSpec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PredictorConfig:
    """What each actor needs; plain data so Ray can ship it."""

    model: dict[str, Any]
    top_k: int = 5
    device: str = "auto"
    precision: str = "auto"
    threads: int = 1


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class TorchPredictor:
    """Ray Data callable class: `__init__` loads once per actor, `__call__` predicts one batch."""

    def __init__(self, config: PredictorConfig) -> None:
        torch.set_num_threads(max(1, config.threads))  # Ray sets OMP_NUM_THREADS=1 in workers
        spec = ModelSpec.model_validate(config.model)
        self.top_k = config.top_k
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.precision, self.device)
        self.user_predictor: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None
        if spec.predictor is not None:
            module_name, class_name = spec.predictor.split(":")
            self.user_predictor = getattr(importlib.import_module(module_name), class_name)()
            return
        loaded = load_model(spec)
        self.categories = loaded.categories
        self.model = loaded.module.to(self.device, memory_format=torch.channels_last).eval()
        pre = preprocess_for(spec)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor([m * 255 for m in pre.mean], device=self.device).view(shape)
        self.std = torch.tensor([s * 255 for s in pre.std], device=self.device).view(shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        keys = [str(k) for k in batch["key"]]
        errors = [error_or_none(e) for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if e is None]
        images = batch["image"]
        if self.user_predictor is not None:
            return self._call_user(keys, errors, images)
        results = self._predict_isolating(images, ok, errors)
        ok_after = [i for i in ok if errors[i] is None]
        classes = np.stack([results[i][0] for i in ok_after]) if ok_after else np.zeros((0, self.top_k), int)
        scores = np.stack([results[i][1] for i in ok_after]) if ok_after else np.zeros((0, self.top_k))
        return prediction_table(keys, errors, classes, scores, self.categories)

    def _predict_isolating(
        self, images: np.ndarray, rows: list[int], errors: list[str | None]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Predict `rows`; on failure split in halves until the failing rows are single, then mark them."""
        if not rows:
            return {}
        try:
            classes, scores = self.predict_uint8(images[rows])
        except (RuntimeError, ValueError, TypeError) as err:
            if len(rows) == 1:
                errors[rows[0]] = f"predict: {type(err).__name__}: {err}"
                return {}
            half = len(rows) // 2
            left = self._predict_isolating(images, rows[:half], errors)
            return {**left, **self._predict_isolating(images, rows[half:], errors)}
        return {row: (classes[j], scores[j]) for j, row in enumerate(rows)}

    @torch.inference_mode()
    def predict_uint8(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC → (top-k classes, top-k probabilities), both (N, k)."""
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        x = tensor.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(x)
        probs = logits.float().softmax(dim=-1)
        scores, classes = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        return classes.to(torch.int32).cpu().numpy(), scores.cpu().numpy()

    def _call_user(self, keys: list[str], errors: list[str | None], images: np.ndarray) -> pa.Table:
        """A user predictor gets the decodable rows and returns `top_k_classes`/`top_k_scores` (+ labels)."""
        ok = [i for i, e in enumerate(errors) if e is None]
        out = self.user_predictor({"key": np.asarray([keys[i] for i in ok]), "image": images[ok]}) if ok else {}
        classes = np.asarray(out.get("top_k_classes", np.zeros((0, 1), int)))
        scores = np.asarray(out.get("top_k_scores", np.zeros((0, 1))))
        categories = list(out.get("categories", [f"class_{i}" for i in range(int(classes.max(initial=0)) + 1)]))
        return prediction_table(keys, errors, classes, scores, categories)
