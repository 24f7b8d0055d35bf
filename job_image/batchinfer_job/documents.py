"""Reading BatchInference documents (YAML files or API objects) and explaining what is wrong with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from batchinfer_job.spec import BatchInference, BatchInferenceSpec


class SpecError(ValueError):
    """A BatchInference that does not fit the schema; `problems` name each field and the fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "function-after", "tagged-union")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def explain(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: `field.path: what is wrong`."""
    problems = []
    for item in err.errors(include_url=False):
        path = _path(tuple(item["loc"]))
        full = ".".join(p for p in (prefix, path) if p) or "(document)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        problems.append(f"{full}: {message}")
    return problems


def parse_spec(spec: dict[str, Any]) -> BatchInferenceSpec:
    """Validate a `.spec` mapping (as the operator receives it)."""
    try:
        return BatchInferenceSpec.model_validate(spec)
    except ValidationError as err:
        raise SpecError(explain(err, prefix="spec")) from None


def parse_document(document: Any) -> BatchInference:
    """Validate a whole BatchInference document."""
    if not isinstance(document, dict):
        raise SpecError(
            [f"(document): expected a mapping with apiVersion/kind/metadata/spec, got {type(document).__name__}"]
        )
    try:
        return BatchInference.model_validate(document)
    except ValidationError as err:
        raise SpecError(explain(err)) from None


def load_documents(path: Path) -> list[Any]:
    """Every YAML document in a file (empty documents skipped)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError([f"{path}: cannot read: {err.strerror}"]) from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise SpecError([f"{path}: not valid YAML: {err}"]) from None


def load_batchinference(path: Path) -> BatchInference:
    """The one BatchInference in a file; SpecError lists every problem."""
    documents = [d for d in load_documents(path) if not isinstance(d, dict) or d.get("kind") == "BatchInference"]
    if len(documents) != 1:
        raise SpecError([f"{path}: expected exactly one BatchInference document, found {len(documents)}"])
    return parse_document(documents[0])
