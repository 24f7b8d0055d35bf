"""Validate objects against CRD openAPIV3Schemas as an API server would (types, enums, ranges, required).

OpenAPI v3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum). CEL rules are not evaluated
here: the operator tests check the same rules through the operator's own behaviour.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from batchinfer_operator.crd import crd_manifest

KUBERAY = Path(__file__).resolve().parents[1] / "manifests" / "kuberay"


def version_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} serves no version {version}")


def validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@cache
def batchinference_validator() -> jsonschema.Draft4Validator:
    return validator(version_schema(crd_manifest(), "v1alpha1"))


@cache
def kuberay_validator(kind: str) -> jsonschema.Draft4Validator:
    """`kind` is rayjobs or rayclusters; validated against the served ray.io/v1 schema."""
    crd = yaml.load((KUBERAY / f"ray.io_{kind}.yaml").read_text(), Loader=yaml.CSafeLoader)
    return validator(version_schema(crd, "v1"))


def schema_errors(v: jsonschema.Draft4Validator, obj: dict[str, Any]) -> list[str]:
    """Every violation as `path: message`, like an API server's 422 causes."""
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in v.iter_errors(obj))
