"""The CRD is generated from the schema, structural, and agrees with `batchinfer validate`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchinfer_operator.crd import crd_manifest, crd_yaml
from tests.crd_schemas import batchinference_validator, schema_errors
from tests.helpers import document

COMMITTED = Path("manifests/crds/batchinference.yaml")
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"}


def walk(node: Any, path: str = "") -> list[tuple[str, dict]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, child in node.get("properties", {}).items():
            found += walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            found += walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            found += walk(node["additionalProperties"], f"{path}{{}}")
    return found


def openapi() -> dict:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_the_generated_one() -> None:
    assert COMMITTED.read_text() == crd_yaml(), "CRD drifted from the schema: run `make crds`"


def test_crd_schema_is_structural() -> None:
    for path, node in walk(openapi()):
        assert not FORBIDDEN & set(node), f"{path} uses {FORBIDDEN & set(node)}"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties false"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: arrays need maxItems for CEL cost estimates"


def test_crd_names_printer_columns_and_status_subresource() -> None:
    crd = crd_manifest()
    assert crd["metadata"]["name"] == "batchinferences.batchinfer.dev"
    assert crd["spec"]["names"]["shortNames"] == ["bi"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Progress"] == ".status.progress.display"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_field_descriptions_reach_kubectl_explain() -> None:
    spec = openapi()["properties"]["spec"]["properties"]
    assert "exactly one of" in spec["model"]["description"].lower() or spec["model"]["description"]
    assert "prefix" in spec["input"]["properties"]["uri"]["description"]
    assert spec["output"]["properties"]["mode"]["enum"] == ["error_if_exists", "overwrite"]


@pytest.mark.parametrize("sample", sorted(Path("manifests/samples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sample_passes_the_crd_schema(sample: Path) -> None:
    for doc in yaml.safe_load_all(sample.read_text()):
        if doc and doc.get("kind") == "BatchInference":
            assert schema_errors(batchinference_validator(), doc) == []


def test_crd_schema_rejects_what_validate_rejects() -> None:
    bad = document(
        {
            "model": {"packaged": "efficientnet_lite0"},
            "input": {"uri": "x", "format": "videos"},
            "output": {"uri": "y", "topK": 0},
        }
    )
    errors = "\n".join(schema_errors(batchinference_validator(), bad))
    assert "spec.input.format: 'videos' is not one of ['images', 'parquet', 'manifest']" in errors
    assert "spec.output.topK: 0 is less than the minimum of 1" in errors


def test_cel_rules_guard_model_source_and_immutability() -> None:
    spec = openapi()["properties"]["spec"]["properties"]
    rules = [r["rule"] for r in spec["model"]["x-kubernetes-validations"]]
    assert any("filter(x, x).size() == 1" in r for r in rules)
    for field in ("model", "input", "output", "compute"):
        assert {
            "rule": "self == oldSelf",
            "message": f"spec.{field} is immutable; create a new BatchInference instead",
        } in spec[field]["x-kubernetes-validations"]
    assert "x-kubernetes-validations" not in spec["suspend"]


def test_generated_crds_hold_no_yaml_anchors_or_aliases() -> None:
    for path in [Path("manifests/crds/batchinference.yaml"), Path("charts/batchinfer/crds/batchinference.yaml")]:
        text = path.read_text()
        assert not re.search(r"[&*]id\d+", text), f"{path} carries YAML anchors/aliases"


def test_torchvision_catalog_matches_the_installed_torchvision() -> None:
    from batchinfer_job import torchvision_catalog

    assert torchvision_catalog.CATALOG_FILE.read_text() == torchvision_catalog.catalog_json(), "run `make crds`"
    assert "resnet152" in torchvision_catalog.catalog()


def test_every_documented_default_is_the_default_a_spec_gets() -> None:
    """The README's reference says `Default: X` for a field; a spec that leaves it unset gets exactly X
    (the head's memory was documented as the workers' 8Gi while it was 4Gi)."""
    import json
    import re

    from batchinfer_job.spec import BatchInferenceSpec

    minimal = {"model": {"packaged": "efficientnet_lite0"}, "input": {"uri": "in/"}, "output": {"uri": "out/"}}
    got = BatchInferenceSpec.model_validate(minimal).model_dump(mode="json")
    rows = re.findall(r"^\| `spec\.([A-Za-z.]+)` \|.*Default: (.+?)\. \|$", Path("README.md").read_text(), re.M)
    checked = 0
    for path, documented in rows:
        value: object = got
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:  # inside an optional section the minimal spec does not have
            continue
        assert value == json.loads(documented), (path, documented, value)
        checked += 1
    assert checked > 20 and any(p == "cluster.head.memory" for p, _ in rows)
