"""What may change after a BatchInference is created: `suspend` only. Pure helpers for that rule."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from batchinfer_job.spec import BatchInferenceSpec

MUTABLE_FIELDS = frozenset({"suspend"})


def spec_hash(spec: BatchInferenceSpec) -> str:
    """A hash of everything in the (defaulted) spec that must not change."""
    frozen = spec.model_dump(mode="json", exclude=set(MUTABLE_FIELDS))
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()[:16]


def changed_fields(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """Top-level spec fields that differ, except the mutable ones, as `spec.<field>`."""
    old, new = old or {}, new or {}
    keys = sorted((set(old) | set(new)) - MUTABLE_FIELDS)
    return [f"spec.{key}" for key in keys if old.get(key) != new.get(key)]
