"""The operator against malformed objects and a flaky API: reject or fail each with the field named, keep
serving valid ones, retry what heals."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import kubernetes
import pytest
from kubernetes.client.rest import ApiException
from urllib3.exceptions import ProtocolError

from batchinfer_operator import kube
from batchinfer_operator.handlers.batchinference import condition, conditions_of, merge_condition, record_condition
from tests.helpers import eventually
from tests.operator_env import Api, quickstart_spec


def variant(path: str, value: Any) -> dict:
    """The quickstart spec with one field set (value ...: delete it)."""
    spec = copy.deepcopy(quickstart_spec())
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return spec


# Caught by the CRD's openAPIV3Schema at admission (422), each naming its field.
AT_ADMISSION = [
    ("model.packaged", "resnet", "spec.model.packaged"),
    ("model.torchvision", {"name": "ResNet50"}, "spec.model.torchvision.name"),
    ("model.torchvision", {"weights": "DEFAULT"}, "spec.model.torchvision"),
    ("model.predictor", 42, "spec.model.predictor"),
    ("input", ..., "spec"),
    ("input.uri", ..., "spec.input"),
    ("input.uri", "", "spec.input.uri"),
    ("input.format", "video", "spec.input.format"),
    ("input.limit", 0, "spec.input.limit"),
    ("input.maxImageBytes", 10, "spec.input.maxImageBytes"),
    ("output", ..., "spec"),
    ("output.topK", 0, "spec.output.topK"),
    ("output.topK", 1000, "spec.output.topK"),
    ("output.mode", "append", "spec.output.mode"),
    ("output.format", "csv", "spec.output.format"),
    ("output.shardRows", 0, "spec.output.shardRows"),
    ("batching.batchSize", -1, "spec.batching.batchSize"),
    ("batching.batchSize", "64", "spec.batching.batchSize"),
    ("compute.device", "tpu", "spec.compute.device"),
    ("compute.precision", "int8", "spec.compute.precision"),
    ("compute.minActors", 0, "spec.compute.minActors"),
    ("compute.gpusPerActor", -1, "spec.compute.gpusPerActor"),
    ("compute.cpusPerActor", 0, "spec.compute.cpusPerActor"),
    ("errorPolicy.maxFailedPercent", 150, "spec.errorPolicy.maxFailedPercent"),
    ("timeouts.stallSeconds", 0, "spec.timeouts.stallSeconds"),
    ("cluster.workers", {"replicas": -1}, "spec.cluster.workers.replicas"),
    ("cluster.head", {"cpu": "two"}, "spec.cluster.head.cpu"),
    ("suspend", "yes", "spec.suspend"),
    ("backoffLimit", 1000, "spec.backoffLimit"),
]

# Stored as they are (created before the schema tightened, or rules only CEL can express): the operator
# fails each with the field named.
STORED = [
    (
        "model",
        {"packaged": "efficientnet_lite0", "torchvision": {"name": "resnet50"}},
        "spec.model: model needs exactly one",
    ),
    ("model", {}, "spec.model: model needs exactly one of torchvision, weightsUri, packaged, predictor; got none"),
    (
        "model",
        {"architecture": "resnet50", "packaged": "efficientnet_lite0"},
        "spec.model: model.architecture only goes",
    ),
    ("model", {"predictor": "not a reference"}, "spec.model.predictor: model.predictor 'not a reference' must look"),
    ("model", {"weightsUri": "ftp://host/w.pt"}, "spec.model.weightsUri: model.weightsUri has unsupported scheme"),
    ("input", {"uri": "s3://b/in", "format": "parquet"}, "spec.input: input.format=parquet needs exactly one"),
    ("input", {"uri": "s3://b/in", "imageColumn": "img"}, "spec.input: input.imageColumn/pathColumn/keyColumn only"),
    ("input.uri", "gopher://host/in", "spec.input.uri: input.uri has unsupported scheme 'gopher'"),
    ("compute", {"minActors": 5, "maxActors": 2}, "spec.compute: compute.minActors (5) must not exceed"),
    ("compute", {"device": "cuda"}, "spec.compute: compute.device=cuda needs compute.gpusPerActor > 0"),
    ("compute", {"device": "cpu", "gpusPerActor": 1}, "spec: compute.device=cpu contradicts compute.gpusPerActor"),
    ("output.colour", "blue", "spec.output.colour: unknown field"),
    (
        "cluster.workers",
        {"minReplicas": 3, "replicas": 1, "maxReplicas": 4},
        "spec.cluster.workers: cluster.workers needs",
    ),
    (
        "scheduling.queueName",
        "Team_ML",
        "spec.scheduling.queueName: scheduling.queueName 'Team_ML' must be a DNS label",
    ),
]


def test_there_are_at_least_thirty_distinct_malformed_objects() -> None:
    assert len(AT_ADMISSION) + len(STORED) + 2 >= 30  # +2: the whole-spec cases below


@pytest.mark.parametrize(("path", "value", "field"), AT_ADMISSION, ids=[f"{p}={v!r}" for p, v, _ in AT_ADMISSION])
def test_schema_violations_are_rejected_at_admission_naming_the_field(cluster, cluster_namespace, path, value, field):
    """On the real API server (server-side dry run), with the generated CRD."""
    body = {"apiVersion": "batchinfer.dev/v1alpha1", "kind": "BatchInference", "metadata": {"name": "bad"}}
    with pytest.raises(ApiException) as err:
        cluster.create_bi(cluster_namespace, {**body, "spec": variant(path, value)}, dry_run=True)
    assert err.value.status == 422
    assert field in err.value.body, err.value.body


def test_operator_fails_each_stored_malformed_object_and_keeps_serving(operator, k8s, namespace) -> None:
    api = Api()
    k8s.emulator.validating = False
    try:
        names = []
        for index, (path, value, _) in enumerate(STORED):
            names.append(f"bad-{index}")
            api.create_bi(namespace, names[-1], variant(path, value))
        api.create_bi(namespace, "bad-spec-string", "model: resnet")
        api.create_bi(namespace, "bad-status", {"model": 5}, status={"conditions": "garbage", "phase": 7})
    finally:
        k8s.emulator.validating = True
    api.create_bi(namespace, "good", quickstart_spec())

    def failed_with(name: str, expected: str) -> bool:
        status = api.get_bi(namespace, name).get("status") or {}
        return status.get("phase") == "Failed" and expected in status.get("message", "")

    for name, (_, _, expected) in zip(names, STORED, strict=True):
        eventually(lambda n=name, e=expected: failed_with(n, e), what=f"{name} Failed with {expected!r}")
    eventually(lambda: failed_with("bad-spec-string", "spec: expected an object"), what="string spec failed")
    eventually(lambda: failed_with("bad-status", "spec.model:"), what="junk status object failed")
    rayjobs = eventually(lambda: api.rayjobs(namespace), what="the valid BatchInference's RayJob")
    assert [j["metadata"]["name"] for j in rayjobs] == ["good"]
    warnings = {e.involved_object.name for e in api.events(namespace) if e.reason == "SpecInvalid"}
    assert set(names) <= warnings


def test_transient_api_errors_are_retried_until_the_children_exist(operator, k8s, namespace, monkeypatch) -> None:
    monkeypatch.setattr(kube, "RETRY_DELAY", 0.5)
    k8s.emulator.faults.extend([("CREATE", "configmaps", 429), ("CREATE", "rayjobs", 503), ("CREATE", "rayjobs", 500)])
    api = Api()
    api.create_bi(namespace, "flaky", quickstart_spec())
    rayjobs = eventually(lambda: api.rayjobs(namespace), timeout=60, what="the RayJob after retries")
    assert len(rayjobs) == 1 and not k8s.emulator.faults
    assert len(api.configmaps(namespace)) == 1


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (409, kopf.PermanentError),
        (410, kopf.TemporaryError),
        (429, kopf.TemporaryError),
        (500, kopf.TemporaryError),
        (503, kopf.TemporaryError),
        (403, kopf.PermanentError),
        (422, kopf.PermanentError),
    ],
)
def test_api_errors_map_to_retry_semantics(status: int, kind: type) -> None:
    with pytest.raises(kind, match=f"create thing: HTTP {status}"), kube.api_errors("create thing"):
        raise ApiException(status=status, reason="x")


def test_connection_errors_are_temporary() -> None:
    with pytest.raises(kopf.TemporaryError, match="read thing"), kube.api_errors("read thing"):
        raise ProtocolError("connection reset")


def test_kubernetes_client_is_pointed_at_the_emulator(k8s) -> None:
    assert kubernetes.client.Configuration.get_default_copy().host == k8s.url


def test_concurrent_status_writers_keep_each_others_conditions(k8s, namespace) -> None:
    """The RayJob mirror and the spec-change handler both write status.conditions (a list): a write computed
    from a stale read is refused and computed again, so neither drops the other's condition."""
    api = Api()
    api.create_bi(namespace, "race", quickstart_spec())
    reads: list[str] = []

    def mirror(bi: dict[str, Any]) -> dict[str, Any]:
        reads.append(bi["metadata"]["resourceVersion"])
        if len(reads) == 1:  # another writer gets in between this read and its write
            record_condition(namespace, "race", condition("SpecRejected", True, "ImmutableField", "", 1))
        return {
            "conditions": merge_condition(conditions_of(bi.get("status")), condition("Running", True, "Running", "", 1))
        }

    kube.update_batchinference_status(namespace, "race", mirror)
    conditions = api.get_bi(namespace, "race")["status"]["conditions"]
    assert sorted(c["type"] for c in conditions) == ["Running", "SpecRejected"]
    assert len(reads) == 2 and reads[0] != reads[1]
