"""Small builders shared by tests."""

from __future__ import annotations

from typing import Any

from batchinfer_job.spec import BatchInferenceSpec


def make_spec(input_uri: str, output_uri: str, **overrides: Any) -> BatchInferenceSpec:
    """A CPU spec with the offline EfficientNet-Lite0; `overrides` replace top-level sections."""
    body: dict[str, Any] = {
        "model": {"packaged": "efficientnet_lite0"},
        "input": {"uri": input_uri},
        "output": {"uri": output_uri, "topK": 3},
        "batching": {"batchSize": 8},
        "compute": {"device": "cpu", "minActors": 1, "maxActors": 1},
    }
    body.update(overrides)
    return BatchInferenceSpec.model_validate(body)


def document(spec: dict[str, Any], name: str = "sample") -> dict[str, Any]:
    return {"apiVersion": "batchinfer.dev/v1alpha1", "kind": "BatchInference", "metadata": {"name": name}, "spec": spec}
