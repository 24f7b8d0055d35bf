"""The `BatchInference` schema: the one source of truth.

The CRD (`batchinfer crd`), `batchinfer validate`, the operator's renderer and the job all read these models.
Field descriptions become `kubectl explain` text. Pure pydantic: no torch, ray or kopf here.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from batchinfer_job import torchvision_catalog

API_GROUP = "batchinfer.dev"
API_VERSION = "v1alpha1"
KIND = "BatchInference"
PLURAL = "batchinferences"
SINGULAR = "batchinference"
SHORT_NAMES = ["bi"]

STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "az", "file", "local")
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "az")  # these name a bucket (container) first
LOCAL_SCHEMES = ("file", "local")
DEFAULT_PRE_RUNNING_DEADLINE_SECONDS = 1800  # image pulls of several GB and GPU nodes scaled up fit
INT32_MAX = 2**31 - 1  # Kubernetes and KubeRay declare these fields int32
INT64_MAX = 2**53 - 1  # the largest integer every JSON and YAML reader (Helm included) keeps exact
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PREDICTOR_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENDPOINT_URL = re.compile(
    r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?)(:[0-9]{1,5})?(/[A-Za-z0-9._~%-]*)*$"
)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_MAP_ENTRIES = 64
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"^({_DNS_SUBDOMAIN.pattern[1:-1]}/)?{_LABEL_NAME}$")
LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
# The image reference grammar containerd and the kubelet parse (distribution/reference): an optional registry
# (host[:port]), lowercase path components, an optional tag and an optional digest.
_DOMAIN_PART = r"([A-Za-z0-9]|[A-Za-z0-9][-A-Za-z0-9]*[A-Za-z0-9])"
_PATH_PART = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(
    rf"^({_DOMAIN_PART}(\.{_DOMAIN_PART})*(:[0-9]+)?/)?{_PATH_PART}(/{_PATH_PART})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)


def _label_key(value: str) -> str:
    if len(value) > 317 or not LABEL_KEY.match(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes label key: [prefix/]name, the name up to 63 of [A-Za-z0-9-_.] starting "
            "and ending alphanumeric, the prefix a DNS subdomain (e.g. nvidia.com/gpu.present)"
        )
    return value


def _label_value(value: str) -> str:
    if not LABEL_VALUE.match(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes label value: up to 63 of [A-Za-z0-9-_.], starting and ending "
            "alphanumeric (or empty)"
        )
    return value


# The patterns also go into the CRD, so the API server refuses what `validate` refuses (map keys excepted: a
# structural schema has no pattern for them; the operator's validation checks those).
LabelKey = Annotated[
    str,
    Field(min_length=1, max_length=317, json_schema_extra={"pattern": LABEL_KEY.pattern}),
    AfterValidator(_label_key),
]
LabelValue = Annotated[
    str, Field(max_length=63, json_schema_extra={"pattern": LABEL_VALUE.pattern}), AfterValidator(_label_value)
]


class _Model(BaseModel):
    """Base for spec models: camelCase in YAML, unknown keys rejected (as the CRD prunes/refuses them).

    Strict: a string is never coerced to a number or a boolean (`suspend: "yes"`), as the API server does not.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)


def is_dns_label(value: str) -> bool:
    """A Kubernetes DNS label (a namespace name): at most 63 of [a-z0-9-], alphanumeric at both ends."""
    return len(value) <= 63 and bool(_DNS_LABEL.match(value))


def check_endpoint_url(value: str, field: str) -> str:
    """An S3 endpoint: http(s)://host[:port][/path], nothing else (no credentials, query or spaces)."""
    if not ENDPOINT_URL.match(value):
        raise ValueError(
            f"{field} {value!r} is not an endpoint URL; give http://host[:port] or https://host[:port] "
            "(e.g. http://minio.minio.svc:9000)"
        )
    return value


def check_storage_uri(value: str, field: str) -> str:
    """Accept `scheme://…` for a supported scheme (any case), or a plain local path; reject anything else.

    One grammar everywhere: no fsspec chains (`a::b`), an object store names its bucket, and the scheme is
    returned lowercased so every later step sees the same URI.
    """
    if not value.strip():
        raise ValueError(f"{field} must not be empty; give a prefix such as s3://bucket/path or ./data")
    if "::" in value:
        raise ValueError(f"{field} {value!r} contains '::' (a URL chain); give one plain URI or path")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{field} contains a control character; remove it")
    match = _URI_SCHEME.match(value)
    if not match:
        return value
    scheme = match.group(1).lower()
    if scheme not in STORAGE_SCHEMES:
        raise ValueError(
            f"{field} has unsupported scheme {match.group(1)!r}; use one of "
            + ", ".join(f"{s}://" for s in STORAGE_SCHEMES)
            + " or a local path"
        )
    rest = value[match.end() :]
    if scheme in OBJECT_STORE_SCHEMES and (not rest or rest.startswith("/")):
        raise ValueError(f"{field} {value!r} names no bucket; write {scheme}://BUCKET/prefix")
    return f"{scheme}://{rest}"


# Relative local paths are compared as if below this stand-in for the working directory: deep enough that
# no run of `..` climbs out of it, and named so that no real path lies inside it.
_CWD_STAND_IN = "/" + "/".join(f".cwd{i}" for i in range(64))


def comparable_path(uri: str) -> tuple[str, str]:
    """(scheme, normalised absolute path) of a URI or local path, for comparing locations lexically.

    Local paths get scheme "file"; relative ones are placed below a stand-in working directory; `..`, `.`
    and repeated or trailing slashes are folded.
    """
    match = _URI_SCHEME.match(uri)
    scheme = match.group(1).lower() if match else "file"
    path = uri[match.end() :] if match else uri
    if scheme in LOCAL_SCHEMES:
        scheme = "file"
        if not path.startswith("/"):
            path = f"{_CWD_STAND_IN}/{path}"
    path = posixpath.normpath(path) if path else "."
    return scheme, "/" + path.lstrip("/") if path.startswith("/") else path


def local_path(uri: str) -> str | None:
    """The filesystem path of a local URI (a plain path, file://, local://), or None for object storage."""
    match = _URI_SCHEME.match(uri)
    if not match:
        return uri
    return uri[match.end() :] if match.group(1).lower() in LOCAL_SCHEMES else None


def within_prefixes(uri: str, prefixes: Sequence[str]) -> bool:
    """Whether `uri` lies under one of `prefixes`: lexically, and local paths again after resolving symlinks
    (a link inside an allowed folder may point anywhere)."""
    for prefix in prefixes:
        if not is_within(uri, prefix):
            continue
        path, outer = local_path(uri), local_path(prefix)
        if path is None or outer is None or is_within(os.path.realpath(path), os.path.realpath(outer)):
            return True
    return False


def is_within(inner: str, outer: str) -> bool:
    """True when the location `inner` is `outer` or lies inside it (lexically)."""
    (scheme_in, path_in), (scheme_out, path_out) = comparable_path(inner), comparable_path(outer)
    if scheme_in != scheme_out:
        return False
    return path_in == path_out or path_in.startswith(path_out.rstrip("/") + "/")


class TorchvisionModel(_Model):
    name: str = Field(
        description="torchvision model builder name, e.g. resnet152, efficientnet_b0, vit_b_16.",
        min_length=1,
        max_length=64,
        json_schema_extra={"enum": list[JsonValue](sorted(torchvision_catalog.catalog()))},
    )
    weights: str = Field(
        default="DEFAULT",
        description=(
            "Weights enum member of the model (e.g. IMAGENET1K_V2), DEFAULT, or NONE for random initialisation "
            "(throughput tests). Downloaded from the torchvision zoo at start-up; for air-gapped clusters use "
            "model.weightsUri instead."
        ),
        max_length=64,
        json_schema_extra={"enum": list[JsonValue](torchvision_catalog.all_weights())},
    )

    @model_validator(mode="after")
    def _known_names(self) -> TorchvisionModel:
        known = torchvision_catalog.catalog()
        if self.name not in known:
            close = [n for n in known if n.startswith(self.name[:4])][:6]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ValueError(f"model.torchvision.name {self.name!r} is not a torchvision classification model{hint}")
        allowed = [*torchvision_catalog.SPECIAL_WEIGHTS, *known[self.name]]
        if self.weights not in allowed:
            raise ValueError(
                f"model.torchvision.weights {self.weights!r} is not a weights name of {self.name}; "
                f"use one of {', '.join(allowed)}"
            )
        return self


class ModelSpec(_Model):
    """Exactly one of torchvision, weightsUri, packaged or predictor."""

    torchvision: TorchvisionModel | None = Field(
        default=None, description="A torchvision zoo model with pretrained weights."
    )
    weightsUri: str | None = Field(
        default=None,
        description=(
            "A TorchScript file, or a state_dict for model.architecture, on any supported storage "
            "(s3://, gs://, abfs://, local path/PVC mount)."
        ),
        max_length=2048,
    )
    architecture: str | None = Field(
        default=None,
        description="torchvision builder name that a state_dict in weightsUri belongs to (omit for TorchScript).",
        max_length=64,
        pattern=r"^[a-z][a-z0-9_]*$",
    )
    packaged: Literal["efficientnet_lite0"] | None = Field(
        default=None,
        description="A model shipped inside a Python package, usable offline: efficientnet_lite0 (ImageNet).",
    )
    predictor: str | None = Field(
        default=None,
        description=(
            "Your own predictor class as 'module:Class', importable in the job image. Constructed once per "
            "actor; called per batch with {'key', 'image' (uint8 NHWC)} of the decodable rows; returns "
            "'top_k_classes' and 'top_k_scores' (N x k) and optionally 'categories' (class names)."
        ),
        max_length=256,
        json_schema_extra={"pattern": _PREDICTOR_REF.pattern},
    )

    @field_validator("weightsUri")
    @classmethod
    def _weights_uri(cls, value: str | None) -> str | None:
        return None if value is None else check_storage_uri(value, "model.weightsUri")

    @field_validator("predictor")
    @classmethod
    def _predictor_ref(cls, value: str | None) -> str | None:
        if value is not None and not _PREDICTOR_REF.match(value):
            raise ValueError(f"model.predictor {value!r} must look like 'package.module:ClassName'")
        if value is not None and "__main__" in value.split(":")[0].split("."):
            raise ValueError(
                f"model.predictor {value!r} names a __main__ module, which runs a program when imported; give the "
                "module that defines the class"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        chosen = [name for name in MODEL_SOURCES if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "model needs exactly one of torchvision, weightsUri, packaged, predictor; got "
                + (", ".join(chosen) if chosen else "none")
            )
        if self.architecture is not None and self.weightsUri is None:
            raise ValueError("model.architecture only goes with model.weightsUri; remove it")
        return self

    @property
    def source(self) -> str:
        return next(name for name in MODEL_SOURCES if getattr(self, name) is not None)

    def describe(self) -> str:
        """A short human name of the model, for summaries and the manifest."""
        if self.torchvision:
            return f"torchvision:{self.torchvision.name}/{self.torchvision.weights}"
        if self.weightsUri:
            return f"weightsUri:{self.weightsUri}" + (f" ({self.architecture})" if self.architecture else "")
        if self.packaged:
            return f"packaged:{self.packaged}"
        return f"predictor:{self.predictor}"


MODEL_SOURCES = ("torchvision", "weightsUri", "packaged", "predictor")
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # Pillow's own decompression-bomb error threshold
DEFAULT_MAX_DECODE_SECONDS = 30.0  # one image on one CPU core; ordinary photos take milliseconds


class InputSpec(_Model):
    uri: str = Field(
        description="Where the inputs are: a prefix or folder (s3://, gs://, abfs://, or a local path/PVC mount).",
        min_length=1,
        max_length=2048,
    )
    format: Literal["images", "parquet", "manifest"] = Field(
        default="images",
        description=(
            "images: every image file under uri; parquet: rows of Parquet files under uri; manifest: files under "
            "uri (.txt .lst .manifest: one URI per line; .jsonl: one JSON object per line, the URI in pathColumn, "
            "default uri) that list the images, so nothing is listed. Relative lines are relative to their manifest."
        ),
    )
    imageColumn: str | None = Field(
        default=None, description="format=parquet: column holding encoded image bytes.", max_length=128
    )
    pathColumn: str | None = Field(
        default=None,
        description="format=parquet: column holding image paths/URIs; format=manifest: the JSON lines' URI field.",
        max_length=128,
    )
    keyColumn: str | None = Field(
        default=None,
        description="format=parquet: column that identifies a row (default: the path, or file#row).",
        max_length=128,
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        le=INT64_MAX,
        description="Process at most this many inputs: the first ones in partition order (folders, files, "
        "manifest lines, each sorted). The driver counts rows up to the limit, so keep it for trials.",
    )
    maxImageBytes: int = Field(
        default=64 * 2**20,
        ge=1024,
        le=INT32_MAX,
        description="Inputs larger than this many bytes become error rows (read: TooLarge) instead of being decoded.",
    )
    maxImagePixels: int = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        le=2**30,
        description=(
            "Images with more pixels (width x height) become error rows (decode: DecompressionBombError) "
            "before they are decoded. The default fits a 16k x 10k photo."
        ),
    )
    maxDecodeSeconds: float = Field(
        default=DEFAULT_MAX_DECODE_SECONDS,
        gt=0,
        le=3600,
        description=(
            "An image whose decoding on a CPU takes longer than this becomes an error row (decode: "
            "DecodeTimeoutError), checked between 16 KiB blocks of its data; the job goes on."
        ),
    )

    allowedPrefixes: list[Annotated[str, Field(max_length=2048)]] | None = Field(
        default=None,
        max_length=MAX_MAP_ENTRIES,
        description=(
            "Only inputs under these are read; any other a manifest or Parquet path lists (or a symlink leads to) "
            "becomes an error row that says only that. A class's limits.allowedInputPrefixes is set here."
        ),
    )

    @field_validator("allowedPrefixes")
    @classmethod
    def _prefixes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [check_storage_uri(v, "input.allowedPrefixes entry") for v in value]

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_storage_uri(value, "input.uri")

    @model_validator(mode="after")
    def _columns(self) -> InputSpec:
        if self.format == "parquet" and (self.imageColumn is None) == (self.pathColumn is None):
            raise ValueError("input.format=parquet needs exactly one of input.imageColumn or input.pathColumn")
        if self.format == "images" and (self.imageColumn or self.pathColumn or self.keyColumn):
            raise ValueError("input.imageColumn/pathColumn/keyColumn only apply to input.format=parquet")
        if self.format == "manifest" and (self.imageColumn or self.keyColumn):
            raise ValueError(
                "input.imageColumn/keyColumn do not apply to input.format=manifest (its key is the URI as listed; "
                "input.pathColumn names the URI field of .jsonl manifests)"
            )
        return self


class OutputSpec(_Model):
    uri: str = Field(description="Where predictions go: a prefix or folder.", min_length=1, max_length=2048)
    format: Literal["parquet"] = Field(default="parquet", description="Output file format.")
    topK: int = Field(default=5, ge=1, le=100, description="How many top classes to keep per row.")
    mode: Literal["error_if_exists", "overwrite"] = Field(
        default="error_if_exists",
        description=(
            "error_if_exists: refuse when output already holds data; overwrite: replace it. Either way, an "
            "unfinished output of the same job (a retry, a rerun after a crash) is resumed, not redone."
        ),
    )
    shardRows: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Rows per committed output shard: the unit of progress, resume and exactly-once commit.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_storage_uri(value, "output.uri")


class BatchingSpec(_Model):
    batchSize: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            "Images per model call (default: 256 on GPU, measured fastest for ResNet-152 bf16 on an H200; 16 on "
            "CPU). On a device out-of-memory error the actor halves it and retries the same rows."
        ),
    )


class ComputeSpec(_Model):
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="Where the model runs; auto picks cuda when the actor has a GPU."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description=(
            "Model arithmetic; auto is bf16 where the hardware runs it natively (GPUs with bf16, CPUs with AMX), "
            "else fp32."
        ),
    )
    minActors: int = Field(default=1, ge=1, le=1024, description="Fewest model actors in the pool.")
    maxActors: int = Field(default=1, ge=1, le=1024, description="Most model actors in the pool.")
    gpusPerActor: float = Field(default=0, ge=0, le=8, description="GPUs each model actor takes (0 for CPU).")
    cpusPerActor: float = Field(default=1, gt=0, le=64, description="CPUs each model actor takes.")
    preprocessCpus: float = Field(
        default=1,
        gt=0,
        le=64,
        description="CPUs each read/decode task takes (runs in parallel with the model).",
    )
    decode: Literal["auto", "tasks", "device"] = Field(
        default="auto",
        description=(
            "Where images are decoded, resized and cropped. tasks: CPU tasks beside the model actor (PIL). "
            "device: CPU tasks only read bytes; the model actor decodes the batch on the model's device (nvJPEG "
            "on a GPU, libjpeg-turbo on a CPU), resizes and crops it in one batched operation, overlapping the "
            "model on the previous batch; images it cannot decode there (PNG, CMYK, truncated, ...) fall back "
            "to the tasks decoder in the actor. auto: device when the model runs on the actor's GPU, else tasks."
        ),
    )
    torchThreads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description=(
            "PyTorch threads per actor (default: cpusPerActor). On CPU, more than cpusPerActor lets the model "
            "use cores that decode tasks leave idle."
        ),
    )
    optimize: Literal["auto", "eager", "torchscript", "compile"] = Field(
        default="auto",
        description=(
            "Graph optimisation in each actor: torchscript (trace, freeze, fold batch norms: faster on CPU), "
            "compile (torch.compile for the batch size, in the background while the eager model serves; about "
            "30 s for ResNet-152 on an H200, then ~1.46x its eager rate), eager (none). auto: torchscript on CPU "
            "in fp32; on a GPU compile when the input listing shows at least 521,780 rows per actor (twice the "
            "compile's length of eager work), else eager."
        ),
    )

    @model_validator(mode="after")
    def _pool(self) -> ComputeSpec:
        if self.minActors > self.maxActors:
            raise ValueError(
                f"compute.minActors ({self.minActors}) must not exceed compute.maxActors ({self.maxActors})"
            )
        if self.device == "cuda" and self.gpusPerActor == 0:
            raise ValueError("compute.device=cuda needs compute.gpusPerActor > 0")
        return self


class ErrorPolicySpec(_Model):
    maxFailedRecords: int | None = Field(
        default=None, ge=0, le=INT64_MAX, description="Fail the job once more than this many rows are error rows."
    )
    maxFailedPercent: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Fail the job once error rows exceed this percentage of all inputs.",
    )


class TimeoutsSpec(_Model):
    perBatchSeconds: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description=(
            "A model call longer than this fails its batch, which is split and retried row by row (either decode "
            "mode; decoding has input.maxDecodeSeconds)."
        ),
    )
    stallSeconds: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description=(
            "Fail the job when no prediction arrives for this long (default 600; the first wait includes starting "
            "the model actors). The error names the stage that starved."
        ),
    )


class SecretRef(_Model):
    name: str = Field(
        description="Secret in the BatchInference's namespace.",
        min_length=1,
        max_length=253,
        json_schema_extra={"pattern": _DNS_SUBDOMAIN.pattern},
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _DNS_SUBDOMAIN.match(value):
            raise ValueError(
                f"Secret name {value!r} is not a Kubernetes object name: lowercase letters, digits, '-' and '.', "
                "starting and ending alphanumeric"
            )
        return value


class StorageSpec(_Model):
    secretRef: SecretRef | None = Field(
        default=None,
        description=(
            "Secret whose keys become environment variables of the Ray pods (e.g. AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY). Values are referenced, never copied."
        ),
    )
    endpointUrl: str | None = Field(
        default=None,
        description=(
            "S3-compatible endpoint (MinIO, Ceph), http(s)://host[:port]; sets AWS_ENDPOINT_URL. Under a class "
            "that provides secretRef, only the class's endpoint or one in its limits.allowedEndpoints."
        ),
        max_length=2048,
        json_schema_extra={"pattern": ENDPOINT_URL.pattern},
    )
    region: str | None = Field(default=None, description="Object storage region; sets AWS_REGION.", max_length=64)

    @field_validator("endpointUrl")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint_url(value, "storage.endpointUrl")


class Resources(_Model):
    cpu: str = Field(default="2", description="CPU request and limit per pod.", pattern=r"^[0-9]+(\.[0-9]+|m)?$")
    memory: str = Field(
        default="8Gi",
        description="Memory request and limit per pod.",
        pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$",
    )
    gpu: int = Field(default=0, ge=0, le=16, description="nvidia.com/gpu limit per pod.")


class HeadResources(Resources):
    memory: str = Field(
        default="4Gi",
        description="Memory request and limit of the head pod.",
        pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$",
    )


class WorkersSpec(_Model):
    replicas: int = Field(default=1, ge=0, le=1000, description="Worker pods at start.")
    minReplicas: int = Field(default=1, ge=0, le=1000, description="Fewest worker pods (autoscaling).")
    maxReplicas: int = Field(default=1, ge=0, le=1000, description="Most worker pods (autoscaling).")
    resources: Resources = Field(default_factory=Resources, description="Resources of each worker pod.")

    @model_validator(mode="after")
    def _bounds(self) -> WorkersSpec:
        if not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(
                "cluster.workers needs minReplicas <= replicas <= maxReplicas; got "
                f"{self.minReplicas} <= {self.replicas} <= {self.maxReplicas}"
            )
        return self


SHARED_ACCOUNT_MESSAGE = (
    "cluster.serviceAccountName 'default' is the account of every pod in the namespace: the job's status Role would "
    "be bound to it, letting any of them patch this BatchInference; name a ServiceAccount of the job's own, or leave "
    "it unset (the operator makes one)"
)


class ClusterSpec(_Model):
    image: str | None = Field(
        default=None,
        description="Job image for head and workers (default: the operator's).",
        max_length=512,
        json_schema_extra={"pattern": IMAGE_REFERENCE.pattern},
    )
    rayVersion: str | None = Field(
        default=None, description="Ray version of the image (default: the operator's).", max_length=32
    )
    head: HeadResources = Field(default_factory=HeadResources, description="Head pod resources.")
    workers: WorkersSpec = Field(default_factory=WorkersSpec, description="The worker group.")
    enableInTreeAutoscaling: bool = Field(default=False, description="Let Ray's autoscaler add/remove workers.")
    imagePullSecrets: list[SecretRef] | None = Field(
        default=None,
        max_length=MAX_MAP_ENTRIES,
        description="Secrets of the job's namespace that let every pod of the job pull the job image.",
    )
    serviceAccountName: str | None = Field(
        default=None,
        description=(
            "ServiceAccount of the Ray pods (default: one the operator creates). At most 50 characters, starting "
            "with a letter: KubeRay rewrites longer names (and a leading digit) for its autoscaler."
        ),
        max_length=50,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
    )

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is not None and not IMAGE_REFERENCE.match(value):
            raise ValueError(
                f"cluster.image {value!r} is not an image reference: [registry[:port]/]lowercase/path[:tag]"
                "[@sha256:digest], no spaces (e.g. registry.example.com/ml/batchinfer-job:0.1.0)"
            )
        return value

    @field_validator("serviceAccountName")
    @classmethod
    def _not_the_shared_account(cls, value: str | None) -> str | None:
        if value == "default":
            raise ValueError(SHARED_ACCOUNT_MESSAGE)
        return value

    @model_validator(mode="after")
    def _replicas_need_autoscaling(self) -> ClusterSpec:
        workers = self.workers
        if not self.enableInTreeAutoscaling and workers.maxReplicas != workers.replicas:
            raise ValueError(
                f"cluster.workers.maxReplicas ({workers.maxReplicas}) differs from replicas ({workers.replicas}) "
                "but cluster.enableInTreeAutoscaling is false: without autoscaling KubeRay runs exactly replicas "
                "workers. Set enableInTreeAutoscaling: true, or maxReplicas equal to replicas"
            )
        return self


# core/v1 Toleration and Affinity, as the API server validates them (unknown fields refused, operators and effects
# from their enums, label keys and values in their grammar), so `validate` and the CRD refuse what a pod would.
TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]
_StringList = list[Annotated[str, Field(max_length=253)]]
_LabelKeys = list[LabelKey]


class Toleration(_Model):
    """A core/v1 Toleration."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                 "message": "a toleration without a key needs operator: Exists"},
                {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                 "message": "a toleration with operator: Exists takes no value"},
                {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                 "message": "tolerationSeconds applies to effect: NoExecute only"},
            ]
        }
    )  # fmt: skip
    key: str | None = Field(
        default=None,
        max_length=317,
        description="Taint key ('' with Exists: every taint).",
        json_schema_extra={"pattern": f"^({LABEL_KEY.pattern[1:-1]})?$"},
    )
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default).")
    value: LabelValue | None = Field(default=None, description="Taint value (operator Equal).")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate ('' or unset: every effect)."
    )
    tolerationSeconds: int | None = Field(default=None, description="How long a NoExecute taint is tolerated.")

    @model_validator(mode="after")
    def _core_rules(self) -> Toleration:
        if self.key:
            _label_key(self.key)
        elif self.operator != "Exists":
            raise ValueError("a toleration without a key needs operator: Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator: Exists takes no value")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds applies to effect: NoExecute only")
        return self


class NodeSelectorRequirement(_Model):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: _StringList | None = Field(default=None, max_length=MAX_MAP_ENTRIES)


class FieldSelectorRequirement(_Model):
    key: str = Field(max_length=253, description="A node field, e.g. metadata.name.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: _StringList | None = Field(default=None, max_length=MAX_MAP_ENTRIES)


class NodeSelectorTerm(_Model):
    matchExpressions: list[NodeSelectorRequirement] | None = Field(default=None, max_length=MAX_MAP_ENTRIES)
    matchFields: list[FieldSelectorRequirement] | None = Field(default=None, max_length=MAX_MAP_ENTRIES)


class NodeSelector(_Model):
    nodeSelectorTerms: list[NodeSelectorTerm] = Field(min_length=1, max_length=MAX_MAP_ENTRIES)


class PreferredSchedulingTerm(_Model):
    weight: int = Field(ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(_Model):
    requiredDuringSchedulingIgnoredDuringExecution: NodeSelector | None = None
    preferredDuringSchedulingIgnoredDuringExecution: list[PreferredSchedulingTerm] | None = Field(
        default=None, max_length=MAX_MAP_ENTRIES
    )


class LabelSelectorRequirement(_Model):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] | None = Field(default=None, max_length=MAX_MAP_ENTRIES)


class LabelSelector(_Model):
    matchLabels: dict[LabelKey, LabelValue] | None = Field(default=None, max_length=MAX_MAP_ENTRIES)
    matchExpressions: list[LabelSelectorRequirement] | None = Field(default=None, max_length=MAX_MAP_ENTRIES)


class PodAffinityTerm(_Model):
    labelSelector: LabelSelector | None = None
    namespaceSelector: LabelSelector | None = None
    namespaces: _StringList | None = Field(default=None, max_length=MAX_MAP_ENTRIES)
    topologyKey: LabelKey
    matchLabelKeys: _LabelKeys | None = Field(default=None, max_length=MAX_MAP_ENTRIES)
    mismatchLabelKeys: _LabelKeys | None = Field(default=None, max_length=MAX_MAP_ENTRIES)


class WeightedPodAffinityTerm(_Model):
    weight: int = Field(ge=1, le=100)
    podAffinityTerm: PodAffinityTerm


class PodAffinity(_Model):
    requiredDuringSchedulingIgnoredDuringExecution: list[PodAffinityTerm] | None = Field(
        default=None, max_length=MAX_MAP_ENTRIES
    )
    preferredDuringSchedulingIgnoredDuringExecution: list[WeightedPodAffinityTerm] | None = Field(
        default=None, max_length=MAX_MAP_ENTRIES
    )


class Affinity(_Model):
    """A core/v1 Affinity."""

    nodeAffinity: NodeAffinity | None = None
    podAffinity: PodAffinity | None = None
    podAntiAffinity: PodAffinity | None = None


class HeadSchedulingSpec(_Model):
    nodeSelector: dict[LabelKey, LabelValue] | None = Field(
        default=None, max_length=MAX_MAP_ENTRIES, description="Node selector of the Ray head pod (default: none)."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=MAX_MAP_ENTRIES, description="Tolerations of the Ray head pod (default: none)."
    )
    affinity: Affinity | None = Field(default=None, description="Affinity of the Ray head pod (default: none).")


class SchedulingSpec(_Model):
    queueName: str | None = Field(
        default=None,
        description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label.",
        max_length=63,
        json_schema_extra={"pattern": _DNS_LABEL.pattern},
    )
    priorityClassName: str | None = Field(
        default=None, description="PriorityClass of every pod of the job (head, workers, submitter).", max_length=253
    )
    nodeSelector: dict[LabelKey, LabelValue] | None = Field(
        default=None,
        max_length=MAX_MAP_ENTRIES,
        description="Node selector of the Ray worker pods (the head's is scheduling.head.nodeSelector).",
    )
    tolerations: list[Toleration] | None = Field(
        default=None,
        max_length=MAX_MAP_ENTRIES,
        description="Tolerations of the Ray worker pods (the head's are scheduling.head.tolerations).",
    )
    affinity: Affinity | None = Field(
        default=None, description="Affinity of the Ray worker pods (the head's is scheduling.head.affinity)."
    )
    head: HeadSchedulingSpec = Field(
        default_factory=HeadSchedulingSpec,
        description=(
            "Where the Ray head pod goes. The head runs no model (0 CPUs for Ray tasks, no GPU unless "
            "cluster.head.gpu), so by default it takes none of the workers' GPU-node constraints."
        ),
    )

    @field_validator("queueName")
    @classmethod
    def _queue(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL.match(value):
            raise ValueError(f"scheduling.queueName {value!r} must be a DNS label (lowercase, digits, '-')")
        return value


class BatchInferenceSpec(_Model):
    className: str | None = Field(
        default=None,
        description=(
            "BatchInferenceClass whose defaults and limits apply (kubectl get bic); unset: the class marked "
            "batchinfer.dev/is-default-class, if any."
        ),
        max_length=253,
        pattern=_DNS_SUBDOMAIN.pattern,
    )
    model: ModelSpec = Field(description="Which model predicts.")
    input: InputSpec = Field(description="What to predict on.")
    output: OutputSpec = Field(description="Where predictions are written.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="Batching of model calls.")
    compute: ComputeSpec = Field(default_factory=ComputeSpec, description="The model actor pool.")
    errorPolicy: ErrorPolicySpec = Field(
        default_factory=ErrorPolicySpec, description="When per-row errors fail the whole job."
    )
    timeouts: TimeoutsSpec = Field(default_factory=TimeoutsSpec, description="Hung model calls and stalled jobs.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object storage access.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="The Ray cluster (Kubernetes only).")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Pod scheduling.")
    suspend: bool = Field(default=False, description="Hold the RayJob suspended (Kueue admits it by unsuspending).")
    activeDeadlineSeconds: int | None = Field(
        default=None, ge=1, le=INT32_MAX, description="Fail the job when it runs longer than this."
    )
    preRunningDeadlineSeconds: int = Field(
        default=DEFAULT_PRE_RUNNING_DEADLINE_SECONDS,
        ge=1,
        le=INT32_MAX,
        description=(
            "Fail an attempt whose job has not started running this long after its Ray cluster began starting "
            "(an image that cannot be pulled, a missing Secret, GPU pods that never schedule); time queued or "
            "suspended does not count. While it waits, status.message names the pod-level reason."
        ),
    )
    backoffLimit: int = Field(default=0, ge=0, le=100, description="Retries of the whole job on a new cluster.")
    ttlSecondsAfterFinished: int = Field(
        default=60,
        ge=0,
        le=INT32_MAX,
        description=(
            "Seconds after the job ends before KubeRay deletes its RayCluster (every Ray pod, so GPUs are freed). "
            "The RayJob and this BatchInference, with its final status, are kept; predictions stay in storage."
        ),
    )

    @model_validator(mode="after")
    def _gpu_fits(self) -> BatchInferenceSpec:
        if self.compute.gpusPerActor > 0 and self.compute.device == "cpu":
            raise ValueError("compute.device=cpu contradicts compute.gpusPerActor > 0; set gpusPerActor: 0")
        return self

    @model_validator(mode="after")
    def _kueue_without_autoscaling(self) -> BatchInferenceSpec:
        if self.scheduling.queueName and self.cluster.enableInTreeAutoscaling:
            raise ValueError(
                "scheduling.queueName and cluster.enableInTreeAutoscaling: true cannot go together: Kueue admits a "
                "RayJob for a fixed size and refuses autoscaling ones; drop one of them"
            )
        return self

    @model_validator(mode="after")
    def _output_apart_from_input(self) -> BatchInferenceSpec:
        problem = output_location_problem(self.input.uri, self.output.uri)
        if problem:
            raise ValueError(problem)
        return self


def worker_gpus(spec: BatchInferenceSpec) -> int:
    """GPUs per worker pod: cluster.workers.resources.gpu, else enough for one model actor (compute.gpusPerActor)."""
    return spec.cluster.workers.resources.gpu or math.ceil(spec.compute.gpusPerActor)


def job_gpus(spec: BatchInferenceSpec) -> int:
    """Every GPU the job's pods ask for at most: the head's and each worker's at maxReplicas. The one count that
    both the class limit (maxGpusPerJob) and the renderer use."""
    return spec.cluster.head.gpu + worker_gpus(spec) * spec.cluster.workers.maxReplicas


def output_location_problem(input_uri: str, output_uri: str) -> str | None:
    """Why output.uri may not be used (lexically: equal to, inside or above the input, a root, or the
    working directory or above it), or None. Paths relative to the working directory are checked again
    after they are made absolute (`local.check_output_location`)."""
    scheme, path = comparable_path(output_uri)
    if is_within(output_uri, input_uri):
        where = "is input.uri" if comparable_path(input_uri) == (scheme, path) else "lies inside input.uri"
        return f"output.uri {output_uri!r} {where} {input_uri!r}; write predictions to a separate prefix"
    if is_within(input_uri, output_uri):
        return (
            f"output.uri {output_uri!r} contains input.uri {input_uri!r}; overwrite could delete inputs, "
            "so write predictions to a separate prefix"
        )
    if scheme == "file" and is_within(_CWD_STAND_IN, output_uri):
        return (
            f"output.uri {output_uri!r} is the filesystem root or the working directory (or above it); "
            "give a folder of its own, e.g. ./predictions"
        )
    return None


Phase = Literal["Pending", "Queued", "Running", "Retrying", "Succeeded", "Failed", "Suspended"]


class Condition(BaseModel):
    """A Kubernetes-style condition."""

    type: str = Field(description="Ready, Running, Succeeded, Failed or SpecRejected.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="Human-readable detail.")
    lastTransitionTime: str | None = Field(default=None, description="RFC 3339 time of the last change.")
    observedGeneration: int | None = Field(default=None, description="Generation this condition is about.")


class Progress(BaseModel):
    """Row counts the running job reports (at least every 30 s)."""

    processed: int = Field(default=0, ge=0, description="Rows written (successes and error rows).")
    failed: int = Field(default=0, ge=0, description="Rows that became error rows.")
    total: int | None = Field(default=None, ge=0, description="Rows to process, once known.")
    rowsPerSecond: float | None = Field(default=None, ge=0, description="Recent throughput.")
    eta: str | None = Field(default=None, description="Estimated time left, e.g. 4m10s.")
    display: str | None = Field(default=None, description="processed/total (percent), for kubectl get.")
    updateTime: str | None = Field(default=None, description="When these numbers were taken.")


class BatchInferenceStatus(BaseModel):
    """What the operator and the job report."""

    phase: Phase | None = Field(
        default=None,
        description="Pending, Queued (waiting for Kueue to admit it), Running, Retrying (an attempt failed; "
        "backoffLimit allows another), Succeeded, Failed or Suspended.",
    )
    attempt: int | None = Field(
        default=None, ge=1, description="Which attempt of the job runs (or ran last): 1 + failed attempts."
    )
    conditions: list[Condition] | None = Field(default=None, description="Kubernetes-style conditions.")
    rayJobName: str | None = Field(default=None, description="The RayJob this BatchInference runs as.")
    rayClusterName: str | None = Field(default=None, description="The RayCluster KubeRay created for it.")
    dashboardURL: str | None = Field(default=None, description="Ray dashboard of the cluster (a URL).")
    startTime: str | None = Field(default=None, description="When the job's first attempt started running.")
    completionTime: str | None = Field(default=None, description="When the job finished.")
    observedGeneration: int | None = Field(default=None, description="Last spec generation acted upon.")
    reason: str | None = Field(default=None, description="Why it failed (from KubeRay or the job).")
    message: str | None = Field(default=None, description="Detail of the failure.")
    outputUri: str | None = Field(default=None, description="Where the predictions are.")
    acceptedSpecHash: str | None = Field(
        default=None, description="Hash of the spec the job runs with; other values are refused."
    )
    className: str | None = Field(default=None, description="The BatchInferenceClass the job runs under, if any.")
    effectiveSpec: dict[str, Any] | None = Field(
        default=None,
        description="The spec the job runs with: its class's defaults and its own values, fixed when it was "
        "accepted (a later class edit does not change it).",
    )
    progress: Progress | None = Field(default=None, description="Live row counts.")


NAME_MAX = 63  # the name is a label value on every child (batchinfer.dev/name), and labels stop at 63


class ObjectMeta(BaseModel):
    """The subset of metadata batchinfer reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=_DNS_SUBDOMAIN.pattern)] = Field(
        description=f"At most {NAME_MAX} characters: the name goes into labels of every object made for it."
    )
    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=_DNS_LABEL.pattern)] | None = None


class BatchInference(BaseModel):
    """A whole BatchInference document, as `kubectl apply` takes it."""

    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["batchinfer.dev/v1alpha1"]
    kind: Literal["BatchInference"]
    metadata: ObjectMeta
    spec: BatchInferenceSpec
    status: BatchInferenceStatus | None = None
