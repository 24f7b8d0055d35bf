"""The real API server with our generated CRD: it is accepted (CEL cost included), every sample is admitted,
and what `batchinfer validate` refuses the API server refuses too, both naming the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException
from typer.testing import CliRunner

from batchinfer_job import spec as s
from batchinfer_operator.cli import app
from tests.controlplane.fixtures import Cluster

CORPUS = Path(__file__).parent / "corpus" / "bad-batchinferences.yaml"
BAD = [d for d in yaml.safe_load_all(CORPUS.read_text()) if d]
SAMPLES = sorted(Path("manifests/samples").glob("*.yaml"))
runner = CliRunner()


def test_our_crd_is_established_with_its_cel_rules(cluster: Cluster) -> None:
    crd = cluster.extensions.read_custom_resource_definition(f"{s.PLURAL}.{s.API_GROUP}")
    assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)
    served = crd.spec.versions[0].schema.open_apiv3_schema
    rules = [r.rule for r in served.properties["spec"].x_kubernetes_validations]
    assert any("startsWith" in rule for rule in rules), rules  # the output-apart-from-input rule survived
    assert crd.spec.names.short_names == ["bi"]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_every_sample_is_admitted_by_a_server_side_dry_run(
    cluster: Cluster, cluster_namespace: str, sample: Path
) -> None:
    for document in yaml.safe_load_all(sample.read_text()):
        created = cluster.create_bi(cluster_namespace, document, dry_run=True)
        assert created["metadata"]["uid"]  # the server filled what it fills on create
        assert created["spec"]["model"] == document["spec"]["model"]


@pytest.mark.parametrize("document", BAD, ids=lambda d: d["metadata"]["name"])
def test_a_bad_document_is_refused_by_validate_and_by_the_api_server(
    cluster: Cluster, cluster_namespace: str, tmp_path: Path, document: dict
) -> None:
    expect = document["metadata"]["annotations"]["test.batchinfer.dev/expect"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    validated = runner.invoke(app, ["validate", str(path)])
    assert validated.exit_code == 1, validated.output
    assert expect in validated.output and "Traceback" not in validated.output, validated.output

    if document["metadata"]["annotations"].get("test.batchinfer.dev/refused-by") == "operator":
        # A rule across fields a class may set: admission sees only the document, the operator checks the
        # effective spec (test_cluster_classes.py shows it refusing this one).
        assert cluster.create_bi(cluster_namespace, copy.deepcopy(document), dry_run=True)["metadata"]["uid"]
        return
    with pytest.raises(ApiException) as refused:
        cluster.create_bi(cluster_namespace, copy.deepcopy(document), dry_run=True)
    assert refused.value.status in (400, 422), refused.value.body  # 400: strict decoding (unknown field)
    assert expect in refused.value.body, refused.value.body


def test_immutable_sections_refuse_real_updates_and_suspend_may_change(
    cluster: Cluster, cluster_namespace: str
) -> None:
    document = yaml.safe_load(Path("manifests/samples/kueue-queued.yaml").read_text())
    name = document["metadata"]["name"]
    cluster.create_bi(cluster_namespace, document)
    with pytest.raises(ApiException) as refused:
        cluster.patch_bi(cluster_namespace, name, {"spec": {"output": {"topK": 3}}})
    assert refused.value.status == 422
    assert "spec.output is immutable" in refused.value.body
    patched = cluster.patch_bi(cluster_namespace, name, {"spec": {"suspend": False}})
    assert patched["spec"]["suspend"] is False
