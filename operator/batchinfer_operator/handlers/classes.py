"""BatchInferenceClass: read only. The operator warns when more than one class is marked default (then
BatchInferences without spec.className get none, like IngressClass)."""

from __future__ import annotations

from typing import Any

import kopf

from batchinfer_job import classes as c
from batchinfer_job import spec as s
from batchinfer_operator import metrics
from batchinfer_operator.class_choice import default_class_names


@kopf.on.event(s.API_GROUP, s.API_VERSION, c.PLURAL)
def check_default_classes(body: kopf.Body, type: str | None, logger: Any, **_: Any) -> None:
    """On every change of a class: count the defaults, and say so on each default class when there are two."""
    defaults = default_class_names()
    metrics.DEFAULT_CLASSES.set(len(defaults))
    if len(defaults) > 1 and type != "DELETED" and body.metadata.name in defaults:
        message = (
            f"{len(defaults)} BatchInferenceClasses are marked {c.DEFAULT_ANNOTATION}: {', '.join(defaults)}; "
            "BatchInferences without spec.className are refused until one remains"
        )
        logger.warning(message)
        kopf.warn(body, reason="AmbiguousDefaultClass", message=message)
