"""What may change after a BatchInference is created: `suspend` only. Pure helpers for that rule."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from batchinfer_job.classes import set_fields
from batchinfer_job.documents import SpecError, parse_spec

MUTABLE_FIELDS = frozenset({"suspend"})


def spec_hash(raw_spec: Mapping[str, Any]) -> str:
    """A hash of what a BatchInference's own spec sets, except the mutable fields.

    Its own fields, not the effective spec: a class edit must not read as a change of the BatchInference.
    Values equal to the schema's defaults are left out, so defaults an API server fills in change nothing.
    """
    frozen = {k: v for k, v in set_fields(raw_spec, drop_defaults=True).items() if k not in MUTABLE_FIELDS}
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()[:16]


def legacy_spec_hash(raw_spec: Mapping[str, Any]) -> str | None:
    """The hash operators before BatchInferenceClass stored (of the defaulted spec), so that BatchInferences
    they accepted keep accepting `suspend` changes after an upgrade; None when the spec does not parse alone."""
    try:
        parsed = parse_spec(dict(raw_spec))
    except SpecError:
        return None
    frozen = parsed.model_dump(mode="json", exclude={*MUTABLE_FIELDS, "className"})
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()[:16]


def is_accepted(raw_spec: Mapping[str, Any], accepted: str) -> bool:
    """Whether a BatchInference's own spec is still the one accepted (only mutable fields changed)."""
    return accepted in (spec_hash(raw_spec), legacy_spec_hash(raw_spec))


def changed_fields(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """Top-level spec fields that differ, except the mutable ones, as `spec.<field>`."""
    old, new = old or {}, new or {}
    keys = sorted((set(old) | set(new)) - MUTABLE_FIELDS)
    return [f"spec.{key}" for key in keys if old.get(key) != new.get(key)]
