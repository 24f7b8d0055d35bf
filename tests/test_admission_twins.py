"""Every validator of the BatchInference schema has its admission twin.

Constraints pydantic puts in the JSON schema (types, enums, bounds, lengths, patterns) reach the CRD by
generation (`make crds`). What it cannot — the Python validators — is walked here: each one must name a document
of tests/corpus/bad-batchinferences.yaml that `validate` and the real API server both refuse
(tests/test_cluster_admission.py runs them), or, for a rule across fields a class may set, one the operator refuses
on the effective spec (annotated refused-by: operator), or an exemption with its reason. A validator added without
a twin fails this test.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from pathlib import Path

import yaml
from pydantic import BaseModel

from batchinfer_job import spec as s

CORPUS = {
    d["metadata"]["name"]: d for d in yaml.safe_load_all(Path("tests/corpus/bad-batchinferences.yaml").read_text()) if d
}

TWINS = {
    "BatchInferenceSpec._gpu_fits": "bad-48",
    "BatchInferenceSpec._kueue_without_autoscaling": "bad-26",
    "BatchInferenceSpec._output_apart_from_input": "bad-04",
    "ClusterSpec._image": "bad-33",
    "ClusterSpec._not_the_shared_account": "bad-45",
    "ClusterSpec._replicas_need_autoscaling": "bad-25",
    "ComputeSpec._pool": "bad-18",
    "InputSpec._columns": "bad-19",
    "InputSpec._prefixes": "bad-47",
    "InputSpec._uri": "bad-10",
    "ModelSpec._exactly_one_source": "bad-14",
    "ModelSpec._predictor_ref": "bad-32",
    "ModelSpec._weights_uri": "bad-46",
    "OutputSpec._uri": "bad-12",
    "SchedulingSpec._queue": "bad-22",
    "SecretRef._name": "bad-35",
    "StorageSpec._endpoint": "bad-30",
    "Toleration._core_rules": "bad-38",
    "TorchvisionModel._known_names": "bad-08",
    "WorkersSpec._bounds": "bad-49",
    "_label_key": "bad-43",  # the pattern goes with the type into every field that has it
    "_label_value": "bad-44",
}
EXEMPT = {
    "_label_key (map keys)": "a structural schema has no pattern for map keys, and a CEL rule over keys of "
    "unbounded length would be costed at the request size (not tried); validate refuses them, and the operator "
    "checks the spec it reconciles with the same schema",
}


def validators(model: type[BaseModel], seen: set[type] | None = None) -> Iterator[str]:
    """Names of the Python validators of `model` and of every model it contains."""
    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)
    decorators = model.__pydantic_decorators__
    for name in [*decorators.field_validators, *decorators.model_validators]:
        yield f"{model.__name__}.{name}"
    for field in model.model_fields.values():
        yield from _annotated(field.metadata, key=False)
        yield from _inside(field.annotation, seen)


def _annotated(metadata: typing.Iterable[object], key: bool) -> Iterator[str]:
    for item in metadata:
        func = getattr(item, "func", None)
        if func is not None:
            yield func.__name__ + (" (map keys)" if key else "")


def _inside(annotation: object, seen: set[type]) -> Iterator[str]:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        yield from validators(annotation, seen)
        return
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        yield from _annotated(annotation.__metadata__, key=False)
        yield from _inside(args[0], seen)
        return
    for position, arg in enumerate(args):
        if typing.get_origin(annotation) is dict and position == 0 and typing.get_origin(arg) is typing.Annotated:
            yield from _annotated(arg.__metadata__, key=True)
            continue
        yield from _inside(arg, seen)


def test_every_validator_has_an_admission_twin_or_a_reason() -> None:
    walked = set(validators(s.BatchInferenceSpec))
    assert walked == set(TWINS) | set(EXEMPT), (
        f"no twin for {sorted(walked - set(TWINS) - set(EXEMPT))}; gone: {sorted(set(TWINS) | set(EXEMPT) - walked)}"
    )
    for validator, case in TWINS.items():
        assert case in CORPUS, f"{validator}: no corpus document {case}"


def test_the_walk_finds_what_a_new_validator_would_add() -> None:
    """The walk is not vacuous: a model with a field validator, a model validator and an annotated type inside a
    list and a map (key and value) yields each."""
    from pydantic import AfterValidator, field_validator, model_validator

    def grammar(value: str) -> str:
        return value

    word = typing.Annotated[str, AfterValidator(grammar)]

    class Inner(s._Model):
        names: list[word] | None = None

    class Outer(s._Model):
        inner: Inner | None = None
        labels: dict[word, word] | None = None
        size: int = 1

        @field_validator("size")
        @classmethod
        def _size(cls, value: int) -> int:
            return value

        @model_validator(mode="after")
        def _whole(self) -> Outer:
            return self

    assert sorted(validators(Outer)) == ["Outer._size", "Outer._whole", "grammar", "grammar", "grammar (map keys)"]
