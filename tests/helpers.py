"""Small builders shared by tests."""

from __future__ import annotations

import time
from collections.abc import Callable
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


def eventually(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until `check()` returns something truthy (or stops raising AssertionError)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError as err:
            last = err
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
