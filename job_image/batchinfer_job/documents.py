"""Reading BatchInference documents (YAML files or API objects) and explaining what is wrong with them.

User documents are bounded the way the API server bounds them: at most `MAX_DOCUMENT_BYTES` (its 1.5 MiB
object limit), UTF-8, no anchors or aliases (Kubernetes sends JSON, so a spec never needs them), at most
`MAX_DEPTH` levels of nesting, and no duplicate keys. Whatever breaks a bound is a `SpecError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

from batchinfer_job.spec import KIND, BatchInference, BatchInferenceSpec

MAX_DOCUMENT_BYTES = 3 * 2**19  # 1.5 MiB: what the API server stores per object
MAX_DEPTH = 64


class SpecError(ValueError):
    """A BatchInference that does not fit the schema; `problems` name each field and the fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases, deep nesting and duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(
                None, None, "YAML aliases (*name) are not accepted; write the value out", event.start_mark
            )
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise ComposerError(
                None, None, "YAML anchors (&name) are not accepted; write the value out", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels; flatten the document", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                raise ConstructorError(None, None, "mapping keys must be scalars", key_node.start_mark)
            if key in seen:
                raise ConstructorError(None, None, f"duplicate key {key!r}; keep only one of them", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


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


def parse_document(document: Any, classes: Sequence[Any] = ()) -> BatchInference:
    """Validate a whole BatchInference document; with `classes` (BatchInferenceClass objects) its spec becomes
    the effective spec of its class, as the operator computes it (`classes.resolve`)."""
    if not isinstance(document, dict):
        raise SpecError(
            [f"(document): expected a mapping with apiVersion/kind/metadata/spec, got {type(document).__name__}"]
        )
    raw_spec = document.get("spec")
    if isinstance(raw_spec, dict) and (classes or raw_spec.get("className") is not None):
        from batchinfer_job.classes import ClassRejected, resolve  # classes builds on this module

        try:
            spec, _ = resolve(raw_spec, classes)
        except ClassRejected as err:
            hint = [] if classes else ["no BatchInferenceClass given: pass the class's YAML with --class FILE"]
            raise SpecError(err.problems + hint) from None
        document = {**document, "spec": spec.model_dump(mode="json")}
    try:
        return BatchInference.model_validate(document)
    except ValidationError as err:
        raise SpecError(explain(err)) from None


def read_text(path: Path) -> str:
    """A document file's text: at most MAX_DOCUMENT_BYTES, UTF-8; anything else is a SpecError."""
    try:
        if not path.is_file():
            raise SpecError([f"{path}: not a regular file; give the path of a YAML file"])
        with path.open("rb") as handle:
            data = handle.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as err:
        raise SpecError([f"{path}: cannot read: {err.strerror}"]) from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise SpecError([f"{path}: larger than {MAX_DOCUMENT_BYTES} bytes, the API server's limit for one object"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError([f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8"]) from None


def parse_yaml(text: str, source: str) -> list[Any]:
    """Every YAML document in `text` (empty documents skipped), within the bounds above."""
    loader = _BoundedLoader(text)
    try:
        documents = []
        while loader.check_data():
            document = loader.get_data()
            if document is not None:
                documents.append(document)
        return documents
    except yaml.YAMLError as err:
        raise SpecError([f"{source}: not valid YAML: {err}"]) from None
    finally:
        loader.dispose()


def load_documents(path: Path) -> list[Any]:
    """Every YAML document in a file (empty documents skipped)."""
    return parse_yaml(read_text(path), str(path))


def load_batchinferences(path: Path, classes: Sequence[Any] = ()) -> list[BatchInference]:
    """Every document of a file, each a valid BatchInference (under its class, among `classes`); SpecError
    lists every problem of every one.

    `validate`, `render` and `run` all read files through this, so they accept and refuse the same files.
    """
    documents = load_documents(path)
    if not documents:
        raise SpecError([f"{path}: no YAML documents"])
    found, problems = [], []
    for index, document in enumerate(documents):
        where = f"{path}" + (f"[{index}]" if len(documents) > 1 else "")
        kind = document.get("kind") if isinstance(document, dict) else None
        if isinstance(kind, str) and kind != KIND:
            problems.append(
                f"{where}: kind {kind!r} is not a BatchInference; batchinfer reads BatchInference documents "
                "only (apply other objects with kubectl)"
            )
            continue
        try:
            found.append(parse_document(document, classes))
        except SpecError as err:
            problems += [f"{where}: {p}" for p in err.problems]
    problems += _duplicate_names(path, found)
    if problems:
        raise SpecError(problems)
    return found


def _duplicate_names(path: Path, found: Sequence[BatchInference]) -> list[str]:
    """Two documents with one name (in one namespace) would be one object to kubectl apply: the later one
    silently replaces the earlier."""
    seen: dict[tuple[str | None, str], int] = {}
    problems = []
    for doc in found:
        key = (doc.metadata.namespace, doc.metadata.name)
        seen[key] = seen.get(key, 0) + 1
    for (namespace, name), count in seen.items():
        if count > 1:
            where = f" in namespace {namespace!r}" if namespace else ""
            problems.append(
                f"{path}: metadata.name {name!r}{where} is used by {count} BatchInferences; kubectl apply would keep "
                "only the last; give each its own name"
            )
    return problems
