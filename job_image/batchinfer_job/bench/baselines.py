"""The two baselines batchinfer is measured against.

(a) a plain PyTorch loop in the style of the seed's `TorchPredictor.predict_batch`: PIL decode and
    torchvision transforms per image, fp32, one process;
(b) the seed's Ray Data recipe: `read_images` + `map_batches(SeedTorchPredictor, ActorPoolStrategy)` with
    the same per-image transform inside the model actor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import models as tvm
from torchvision import transforms

TRANSFORM = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)


def build_model(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tvm.get_model(name, weights=None).eval().to(device)


def plain_loop(paths: list[Path], model_name: str, device: str, batch_size: int) -> int:
    """Decode, transform and predict batch by batch in this process; returns images predicted."""
    model = build_model(model_name, device)
    done = 0
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            batch = torch.stack([TRANSFORM(Image.open(p).convert("RGB")) for p in chunk]).to(device)
            model(batch).argmax(dim=1).cpu()
            done += len(chunk)
    return done


class SeedTorchPredictor:
    """The seed recipe's actor: per-image PIL transform and fp32 inside the model actor."""

    def __init__(self, model_name: str, device: str) -> None:
        self.device = device
        self.model = build_model(model_name, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        tensors = [TRANSFORM(Image.fromarray(image)) for image in batch["image"]]
        with torch.inference_mode():
            out = self.model(torch.stack(tensors).to(self.device)).argmax(dim=1).cpu().numpy()
        return {"predicted_class": out}


def seed_recipe(paths: list[Path], model_name: str, device: str, batch_size: int, actors: int) -> int:
    import ray.data

    ds = ray.data.read_images([str(p) for p in paths], mode="RGB")
    ds = ds.map_batches(
        SeedTorchPredictor,
        fn_constructor_kwargs={"model_name": model_name, "device": device},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        batch_size=batch_size,
        num_gpus=1 if device == "cuda" else 0,
    )
    return sum(len(b["predicted_class"]) for b in ds.iter_batches(batch_size=None))
