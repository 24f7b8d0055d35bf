"""`BatchInferenceClass`: defaults and limits a platform team sets once for many BatchInferences.

The class schema is derived from the BatchInference schema (`spec.py`), so `spec.defaults.scheduling` has the
shape of a BatchInference's `spec.scheduling`. `effective_spec` is the one function that applies a class: the
operator, `batchinfer render/validate/run --class` all call it. Pure pydantic; no kopf, torch or ray.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, cast, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from batchinfer_job import spec as s
from batchinfer_job.documents import SpecError, explain, load_documents, parse_spec

KIND = "BatchInferenceClass"
PLURAL = "batchinferenceclasses"
SINGULAR = "batchinferenceclass"
SHORT_NAMES = ["bic"]
DEFAULT_ANNOTATION = "batchinfer.dev/is-default-class"

# The "where and how it runs" fields of a BatchInference spec that a class may default.
DEFAULTABLE = (
    "cluster",
    "scheduling",
    "compute",
    "storage",
    "timeouts",
    "errorPolicy",
    "activeDeadlineSeconds",
    "preRunningDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "backoffLimit",
)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `annotation` (`X`, `X | None`), or None for a plain field."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


@cache
def partial_model(model: type[BaseModel], only: tuple[str, ...] | None = None) -> type[BaseModel]:
    """`model` with every field optional and without defaults or cross-field rules (those run on the merged
    spec): the same names, types, bounds, patterns and descriptions, nested models made partial too."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if only is not None and name not in only:
            continue
        nested = _nested_model(info.annotation)
        if nested is not None:
            inner: Any = partial_model(nested)
        else:
            inner = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        fields[name] = (
            Optional[inner],  # noqa: UP045 -- a runtime type built here, not an annotation
            Field(default=None, description=info.description, json_schema_extra=info.json_schema_extra),
        )
    return create_model(f"{model.__name__}Defaults", __base__=s._Model, **fields)


ClassDefaults = partial_model(s.BatchInferenceSpec, DEFAULTABLE)


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted field path of a model, objects and leaves."""
    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        nested = _nested_model(info.annotation)
        if nested is not None:
            out += field_paths(nested, f"{path}.")
    return out


PrefixList = Annotated[list[Annotated[str, Field(min_length=1, max_length=2048)]], Field(max_length=64)]


class ClassLimits(s._Model):
    maxGpusPerJob: int | None = Field(
        default=None,
        ge=0,
        le=s.INT32_MAX,
        description="Most GPUs one job may hold: the head's plus every worker's at cluster.workers.maxReplicas.",
    )
    maxWorkerReplicas: int | None = Field(
        default=None, ge=0, le=1000, description="Most worker pods (cluster.workers.maxReplicas) of one job."
    )
    maxActiveDeadlineSeconds: int | None = Field(
        default=None,
        ge=1,
        le=s.INT32_MAX,
        description="Longest activeDeadlineSeconds a job may ask for; a job that sets none gets this one.",
    )
    allowedInputPrefixes: PrefixList | None = Field(
        default=None, description="input.uri must lie under one of these (e.g. s3://team-a-data/)."
    )
    allowedOutputPrefixes: PrefixList | None = Field(
        default=None, description="output.uri must lie under one of these."
    )
    allowedWeightsPrefixes: PrefixList | None = Field(
        default=None, description="model.weightsUri must lie under one of these."
    )
    allowedImagePrefixes: PrefixList | None = Field(
        default=None,
        description="A cluster.image a BatchInference sets must start with one of these (e.g. registry.corp/ml/).",
    )
    allowedEndpoints: Annotated[list[Annotated[str, Field(max_length=2048)]], Field(max_length=64)] | None = Field(
        default=None,
        description=(
            "Where the class's credentials (defaults.storage.secretRef) may be sent besides the class's own "
            "storage.endpointUrl: a BatchInference that uses them with any other endpoint is refused."
        ),
    )
    overridable: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=64)] = Field(
        default_factory=list,
        description=(
            "Defaulted fields a BatchInference may set itself, as paths under spec (e.g. compute, "
            "cluster.workers.replicas, timeouts); a path allows everything below it. Every other field the "
            "class defaults is enforced: a BatchInference that sets it differently is refused."
        ),
    )

    @field_validator("allowedInputPrefixes", "allowedOutputPrefixes", "allowedWeightsPrefixes")
    @classmethod
    def _uris(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [s.check_storage_uri(v, "limits prefix") for v in value]

    @field_validator("allowedEndpoints")
    @classmethod
    def _endpoints(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [s.check_endpoint_url(v, "limits.allowedEndpoints entry") for v in value]

    @field_validator("overridable")
    @classmethod
    def _known_paths(cls, value: list[str]) -> list[str]:
        known = set(field_paths(ClassDefaults))
        unknown = [v for v in value if v not in known]
        if unknown:
            raise ValueError(
                f"overridable names fields a class cannot default: {', '.join(unknown)}; use paths such as "
                "compute, cluster.workers.replicas or scheduling.nodeSelector"
            )
        return value


class BatchInferenceClassSpec(s._Model):
    description: str | None = Field(default=None, max_length=1024, description="What this class is for.")
    defaults: ClassDefaults = Field(  # type: ignore[valid-type]
        default_factory=ClassDefaults,
        description="Values for BatchInferences of this class, in the shape of a BatchInference's spec.",
    )
    limits: ClassLimits = Field(default_factory=ClassLimits, description="What BatchInferences of this class may ask.")


class ClassMeta(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=s._DNS_SUBDOMAIN.pattern)]
    annotations: dict[str, str] | None = None


class BatchInferenceClass(BaseModel):
    """A whole BatchInferenceClass document (cluster-scoped)."""

    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["batchinfer.dev/v1alpha1"]
    kind: Literal["BatchInferenceClass"]
    metadata: ClassMeta
    spec: BatchInferenceClassSpec = Field(default_factory=BatchInferenceClassSpec)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def is_default(self) -> bool:
        return (self.metadata.annotations or {}).get(DEFAULT_ANNOTATION) == "true"


def parse_class(document: Any) -> BatchInferenceClass:
    """Validate a BatchInferenceClass document; SpecError names each bad field."""
    if not isinstance(document, dict):
        raise SpecError([f"(document): expected a BatchInferenceClass mapping, got {type(document).__name__}"])
    try:
        return BatchInferenceClass.model_validate(document)
    except ValidationError as err:
        name = (document.get("metadata") or {}).get("name") if isinstance(document.get("metadata"), dict) else None
        raise SpecError([f"BatchInferenceClass {name!r}: {p}" for p in explain(err)]) from None


class ClassRejected(ValueError):
    """A BatchInference its class refuses. `reason` is CamelCase (for conditions and Events); `waiting` marks
    refusals the platform team can lift without the user changing anything (a missing class, two defaults)."""

    def __init__(self, reason: str, problems: list[str], waiting: bool = False) -> None:
        super().__init__("; ".join(problems))
        self.reason, self.problems, self.waiting = reason, problems, waiting


def choose_class(class_name: str | None, classes: Sequence[BatchInferenceClass]) -> BatchInferenceClass | None:
    """The class a BatchInference runs under: the one it names, else the single default, else none."""
    if class_name is not None:
        for candidate in classes:
            if candidate.name == class_name:
                return candidate
        known = ", ".join(sorted(c.name for c in classes)) or "none"
        raise ClassRejected(
            "ClassNotFound",
            [
                f"spec.className: BatchInferenceClass {class_name!r} does not exist (known: {known}); "
                "name an existing class (kubectl get bic) or ask the platform team to create it"
            ],
            waiting=True,
        )
    defaults = sorted(c.name for c in classes if c.is_default)
    if len(defaults) > 1:
        raise ClassRejected(
            "AmbiguousDefaultClass",
            [
                f"spec.className: unset, and {len(defaults)} BatchInferenceClasses are marked default "
                f"({', '.join(defaults)}); set spec.className, or have the platform team keep one "
                f'{DEFAULT_ANNOTATION}: "true"'
            ],
            waiting=True,
        )
    return next((c for c in classes if c.name == defaults[0]), None) if defaults else None


def set_fields(
    raw: Mapping[str, Any], model: type[BaseModel] = s.BatchInferenceSpec, prefix: str = "", drop_defaults: bool = False
) -> dict[str, Any]:
    """Dotted path → value of everything set in `raw`, descending into fields that are models.

    drop_defaults leaves out values equal to their field's default (as an API server may fill them in)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        field = model.model_fields.get(key)
        nested = _nested_model(field.annotation) if field else None
        if nested is not None and isinstance(value, Mapping):
            out |= set_fields(value, nested, f"{prefix}{key}.", drop_defaults)
        elif not (drop_defaults and field and not field.is_required() and _default(field) == value):
            out[f"{prefix}{key}"] = value
    return out


def _default(field: Any) -> Any:
    default = field.get_default(call_default_factory=True)
    return default.model_dump(mode="json") if isinstance(default, BaseModel) else default


def _merge(base: Mapping[str, Any], top: Mapping[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`top` over `base`, merging into fields that are models; free-form maps and lists are replaced whole."""
    out = dict(base)
    for key, value in top.items():
        field = model.model_fields.get(key)
        nested = _nested_model(field.annotation) if field else None
        if nested is not None and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value, nested)
        else:
            out[key] = value
    return out


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def class_defaults(cls: BatchInferenceClass) -> dict[str, Any]:
    """What a class defaults, as a partial spec mapping (unset fields left out)."""
    defaults = cast(BaseModel, cls.spec.defaults)
    return defaults.model_dump(mode="json", exclude_none=True)


def enforced_problems(raw_spec: Mapping[str, Any], cls: BatchInferenceClass) -> list[str]:
    """The BatchInference's values that differ from what its class enforces."""
    defaults = set_fields(class_defaults(cls))
    own = set_fields({k: v for k, v in raw_spec.items() if k in DEFAULTABLE})
    allowed = cls.spec.limits.overridable
    problems = []
    for path, value in own.items():
        if any(path == a or path.startswith(a + ".") for a in allowed):
            continue
        clashing = [d for d in defaults if _overlaps(path, d)]
        if not clashing or (clashing == [path] and defaults[path] == value):
            continue
        enforced = ", ".join(f"{d}={json.dumps(defaults[d])}" for d in clashing)
        problems.append(
            f"spec.{path}: BatchInferenceClass {cls.name!r} enforces {enforced}; remove spec.{path}, or ask the "
            f"platform team to list {path} in the class's spec.limits.overridable"
        )
    return problems


def limit_problems(spec: s.BatchInferenceSpec, cls: BatchInferenceClass) -> list[str]:
    """Each limit of the class the effective spec breaks, naming the field, the class and the limit."""
    limits, name, problems = cls.spec.limits, cls.name, []
    workers = spec.cluster.workers
    gpus = s.job_gpus(spec)
    if limits.maxGpusPerJob is not None and gpus > limits.maxGpusPerJob:
        problems.append(
            f"spec.cluster: the job would hold {gpus} GPUs (head {spec.cluster.head.gpu} + {workers.maxReplicas} "
            f"workers x {s.worker_gpus(spec)}, from cluster.workers.resources.gpu or compute.gpusPerActor); "
            f"BatchInferenceClass {name!r} allows at most {limits.maxGpusPerJob} (spec.limits.maxGpusPerJob)"
        )
    if limits.maxWorkerReplicas is not None and workers.maxReplicas > limits.maxWorkerReplicas:
        problems.append(
            f"spec.cluster.workers.maxReplicas: {workers.maxReplicas} exceeds the {limits.maxWorkerReplicas} "
            f"BatchInferenceClass {name!r} allows (spec.limits.maxWorkerReplicas)"
        )
    deadline, most = spec.activeDeadlineSeconds, limits.maxActiveDeadlineSeconds
    if most is not None and deadline is not None and deadline > most:
        problems.append(
            f"spec.activeDeadlineSeconds: {deadline} exceeds the {most} BatchInferenceClass {name!r} allows "
            "(spec.limits.maxActiveDeadlineSeconds)"
        )
    locations = [
        ("input.uri", spec.input.uri, limits.allowedInputPrefixes, "allowedInputPrefixes"),
        ("output.uri", spec.output.uri, limits.allowedOutputPrefixes, "allowedOutputPrefixes"),
        ("model.weightsUri", spec.model.weightsUri, limits.allowedWeightsPrefixes, "allowedWeightsPrefixes"),
    ]
    for field, uri, prefixes, limit in locations:
        if uri is not None and prefixes is not None and not s.within_prefixes(uri, prefixes):
            problems.append(
                f"spec.{field}: {uri!r} is outside what BatchInferenceClass {name!r} allows "
                f"(spec.limits.{limit}: {', '.join(prefixes) or 'nothing'})"
            )
    problems += _endpoint_problems(spec, cls)
    image, images = spec.cluster.image, limits.allowedImagePrefixes
    if image is not None and images is not None and not any(image.startswith(p) for p in images):
        problems.append(
            f"spec.cluster.image: {image!r} does not start with a prefix BatchInferenceClass {name!r} allows "
            f"(spec.limits.allowedImagePrefixes: {', '.join(images) or 'none'})"
        )
    return problems


def _endpoint_problems(spec: s.BatchInferenceSpec, cls: BatchInferenceClass) -> list[str]:
    """The class's credentials go only to the class's endpoint (or one its allowedEndpoints lists): otherwise a
    user could send them anywhere (http://169.254.169.254/, their own server), overridable or not."""
    storage = class_defaults(cls).get("storage") or {}
    credentials = storage.get("secretRef")
    if credentials is None or spec.storage.secretRef is None or spec.storage.secretRef.name != credentials["name"]:
        return []
    endpoint, own = spec.storage.endpointUrl, storage.get("endpointUrl")
    allowed = [own] if own else []
    allowed += cls.spec.limits.allowedEndpoints or []
    if endpoint == own or endpoint in allowed:
        return []
    where = ", ".join(allowed) if allowed else "AWS S3 itself (no endpointUrl)"
    return [
        f"spec.storage.endpointUrl: {endpoint!r} would receive the credentials of Secret {credentials['name']!r} "
        f"that BatchInferenceClass {cls.name!r} provides, which go only to {where}; remove "
        "spec.storage.endpointUrl, or ask the platform team to add it to the class's spec.limits.allowedEndpoints"
    ]


def effective_spec(raw_spec: Mapping[str, Any], cls: BatchInferenceClass | None) -> s.BatchInferenceSpec:
    """The spec a BatchInference runs with: its class's defaults, then its own values where the class allows,
    within the class's limits. Raises ClassRejected (or SpecError without a class) naming every problem."""
    if cls is None:
        return parse_spec(dict(raw_spec))
    problems = enforced_problems(raw_spec, cls)
    if problems:
        raise ClassRejected("EnforcedField", problems)
    defaults = class_defaults(cls)
    merged = _merge(defaults, raw_spec, s.BatchInferenceSpec)
    deadline_cap = cls.spec.limits.maxActiveDeadlineSeconds
    if deadline_cap is not None and merged.get("activeDeadlineSeconds") is None:
        merged["activeDeadlineSeconds"] = deadline_cap
    try:
        spec = parse_spec(merged)
    except SpecError as err:
        raise ClassRejected(
            "SpecInvalid", [f"{p} (with the defaults of BatchInferenceClass {cls.name!r})" for p in err.problems]
        ) from None
    problems = limit_problems(spec, cls)
    if problems:
        raise ClassRejected("ClassLimitExceeded", problems)
    allowed = cls.spec.limits.allowedInputPrefixes
    if allowed is not None:  # the job holds every URI it reads to them, not only input.uri
        spec = spec.model_copy(update={"input": spec.input.model_copy(update={"allowedPrefixes": list(allowed)})})
    return spec.model_copy(update={"className": cls.name})


def resolve(
    raw_spec: Mapping[str, Any], classes: Sequence[BatchInferenceClass]
) -> tuple[s.BatchInferenceSpec, str | None]:
    """(effective spec, class name or None) of a BatchInference's raw spec among the known classes."""
    name = raw_spec.get("className")
    chosen = choose_class(name if isinstance(name, str) else None, classes)
    return effective_spec(raw_spec, chosen), chosen.name if chosen else None


def load_classes(paths: Sequence[Path]) -> list[BatchInferenceClass]:
    """Every BatchInferenceClass in the files, a folder standing for its *.yaml/*.yml files (as `kubectl apply
    -f` takes them); SpecError names each problem."""
    found, problems = [], []
    files = [f for p in paths for f in (sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p])]
    for path in files:
        for index, document in enumerate(load_documents(path)):
            kind = document.get("kind") if isinstance(document, dict) else None
            if kind != KIND:
                problems.append(f"{path}[{index}]: kind {kind!r} is not a BatchInferenceClass; --class takes classes")
                continue
            try:
                found.append(parse_class(document))
            except SpecError as err:
                problems += [f"{path}[{index}]: {p}" for p in err.problems]
    names = [c.name for c in found]
    problems += [f"BatchInferenceClass {n!r} is given twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise SpecError(problems)
    return found
