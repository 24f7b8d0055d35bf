"""Which BatchInferenceClass a BatchInference runs under, read from the cluster; the effective spec it gets.

The rules themselves are `batchinfer_job.classes` (shared with `batchinfer render/validate/run --class`);
this module only fetches the classes and says which stored ones are broken.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchinfer_job import classes as c
from batchinfer_job import spec as s
from batchinfer_job.documents import SpecError
from batchinfer_operator import kube


def _is_default(item: Mapping[str, Any]) -> bool:
    annotations = (item.get("metadata") or {}).get("annotations") or {}
    return annotations.get(c.DEFAULT_ANNOTATION) == "true"


def resolve_in_cluster(raw_spec: Mapping[str, Any]) -> tuple[s.BatchInferenceSpec, str | None]:
    """(effective spec, class name) under the classes stored now; ClassRejected or SpecError says why not.

    A stored class that the schema refuses (stored before it tightened) is reported when it would be used.
    """
    valid: list[c.BatchInferenceClass] = []
    broken: dict[str, str] = {}
    for item in kube.list_classes():
        try:
            valid.append(c.parse_class(item))
        except SpecError as err:
            if raw_spec.get("className") == item["metadata"]["name"] or (
                raw_spec.get("className") is None and _is_default(item)
            ):
                broken[item["metadata"]["name"]] = "; ".join(err.problems)
    if broken:
        raise c.ClassRejected(
            "ClassInvalid",
            [f"spec.className: {problems}; the platform team must fix the class" for problems in broken.values()],
            waiting=True,
        )
    return c.resolve(raw_spec, valid)


def default_class_names() -> list[str]:
    """Names of the classes marked default, sorted."""
    return sorted(item["metadata"]["name"] for item in kube.list_classes() if _is_default(item))
