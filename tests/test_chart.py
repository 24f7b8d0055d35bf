"""The Helm chart, rendered by a real helm binary and validated like a cluster would validate it."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from batchinfer_job import classes as c
from batchinfer_operator.crd import CRD_FILES, crd_yaml
from tests.chart_render import CHART, README_INSTALL, helm, rbac_manifest, run_helm, template, tenant_rbac_manifest

K8S_VERSION = "1.33.0"
VALUES = [None, *sorted((CHART / "ci").glob("*.yaml"))]


@pytest.fixture(scope="module")
def chart() -> Path:
    """The chart as shipped: never a copy with something removed."""
    return CHART


def render(chart: Path, values: Path | None) -> list[dict]:
    args = ["-f", str(values)] if values else []
    return [d for d in yaml.safe_load_all(template(*args, chart=chart)) if d]


def test_helm_lint_strict_passes_with_every_values_file(chart: Path) -> None:
    for values in VALUES:
        args = ["lint", "--strict", *(["-f", str(values)] if values else [])]
        result = run_helm(*args, chart=chart)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUES, ids=lambda v: v.name if v else "defaults")
def test_every_rendered_object_is_valid_kubernetes(chart: Path, values: Path | None) -> None:
    docs = render(chart, values)
    assert {d["kind"] for d in docs} >= {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        if doc["kind"] == "BatchInferenceClass":
            c.parse_class(doc)  # ours: our schema
            continue
        if doc["kind"] in ("ServiceMonitor", "ClusterKopfPeering", "KopfPeering"):
            continue  # custom resources: kubernetes-validate has no schema for them
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values", VALUES, ids=lambda v: v.name if v else "defaults")
def test_rbac_has_no_wildcards_and_no_secrets(chart: Path, values: Path | None) -> None:
    for doc in render(chart, values):
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule.get(key, []), (doc["metadata"]["name"], rule)
                assert "secrets" not in rule["resources"]


@pytest.mark.parametrize("values", VALUES, ids=lambda v: v.name if v else "defaults")
def test_every_container_runs_as_non_root_hardened(chart: Path, values: Path | None) -> None:
    deployments = [d for d in render(chart, values) if d["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["resources"]["limits"] and container["resources"]["requests"]


def test_chart_crd_is_the_generated_one() -> None:
    assert (CHART / "crds" / "batchinference.yaml").read_text() == crd_yaml(), "run `make crds`"


def test_templated_crd_matches_the_generated_one(chart: Path) -> None:
    docs = render(chart, CHART / "ci" / "ha-values.yaml")
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    for file in CRD_FILES:
        generated = yaml.safe_load(crd_yaml(file))
        crd = crds.pop(generated["metadata"]["name"])
        assert crd["spec"] == generated["spec"]
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert not crds


def test_crds_are_valid_apiextensions_v1() -> None:
    for path in (CHART / "crds").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_rbac_manifests_for_users_without_helm_match_the_chart() -> None:
    assert Path("manifests/rbac/operator-rbac.yaml").read_text() == rbac_manifest(), "run `make manifests`"
    assert Path("manifests/rbac/tenant-rbac.yaml").read_text() == tenant_rbac_manifest(), "run `make manifests`"


def test_the_readme_commands_lint_template_and_install_the_chart_as_shipped(tmp_path: Path) -> None:
    """`helm lint`, `helm template … --include-crds` and the README's `helm install` (a client dry run, which
    needs no cluster) on charts/batchinfer itself, from a checkout: no dependency to build first."""
    assert "dependencies" not in yaml.safe_load((CHART / "Chart.yaml").read_text())
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none")}
    commands = [
        ["lint", "charts/batchinfer"],
        ["template", "bi", "charts/batchinfer", "--include-crds"],
        [*README_INSTALL.split()[1:], "--dry-run=client"],
    ]
    for args in commands:
        result = subprocess.run([helm(), *args], capture_output=True, text=True, env=env, check=False)
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}"
    readme = Path("README.md").read_text()
    assert README_INSTALL in readme


def test_image_tags_default_to_app_version(chart: Path) -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (deployment,) = [d for d in render(chart, None) if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(f":{meta['appVersion']}")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BATCHINFER_JOB_IMAGE"].endswith(f":{meta['appVersion']}") and env["BATCHINFER_RAY_VERSION"] == "2.60.0"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("replicaCount=-1", "at '/replicaCount': minimum: got -1, want 0"),
        ("notAValue=1", "additional properties 'notAValue' not allowed"),
        ("image.tag=1", "at '/image/tag': got number, want string"),
        ("metrics.port=80", "at '/metrics/port': minimum: got 80, want 1,024"),
    ],
)
def test_values_schema_rejects_wrong_values(chart: Path, flag: str, message: str) -> None:
    with pytest.raises(RuntimeError) as err:
        template("--set", flag, chart=chart)
    assert "values don't meet the specifications of the schema" in str(err.value)
    assert message in str(err.value)


def test_two_replicas_without_peering_are_refused(chart: Path) -> None:
    with pytest.raises(RuntimeError, match=r"replicaCount > 1 needs peering\.enabled=true"):
        template("--set", "replicaCount=2", "--set", "peering.enabled=false", chart=chart)


def test_dockerfiles_are_hadolint_clean() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), "operator/Dockerfile", "job_image/Dockerfile"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_never_imports_torch_or_ray() -> None:
    extras = tomllib.loads(Path("pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["operator"] if d.split("[")[0].split("=")[0] in ("torch", "ray", "torchvision")]
    assert '".[operator]"' in Path("operator/Dockerfile").read_text()
    probe = (
        "import sys, batchinfer_operator.main, batchinfer_operator.cli, batchinfer_operator.render; "
        "bad = [m for m in ('torch', 'ray', 'torchvision') if m in sys.modules]; "
        "sys.exit(f'operator imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_classes_from_values_are_the_sample_classes(chart: Path) -> None:
    rendered = {d["metadata"]["name"]: d for d in render(chart, CHART / "ci" / "classes-values.yaml")}
    for sample in sorted(Path("manifests/samples/classes").glob("*.yaml")):
        expected = c.parse_class(yaml.safe_load(sample.read_text()))
        got = c.parse_class(rendered[expected.name])
        assert got.spec == expected.spec and got.is_default == expected.is_default, sample


def test_two_default_classes_in_values_fail_the_render_naming_them(chart: Path) -> None:
    both = '{"a":{"default":true},"b":{"default":true}}'
    result = run_helm("template", "bi", "--set-json", f"classes={both}", chart=chart)
    assert result.returncode != 0 and "a, b are all marked default: true" in result.stderr


def test_tenant_roles_aggregate_into_the_builtin_roles_and_never_write_classes(chart: Path) -> None:
    roles = {d["metadata"]["name"]: d for d in render(chart, None) if d["kind"] == "ClusterRole"}
    edit, view = roles["batchinfer-edit"], roles["batchinfer-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    for role in (edit, view, roles["batchinfer-class-reader"]):
        for rule in role["rules"]:
            if "batchinferenceclasses" in rule["resources"]:
                assert set(rule["verbs"]) == {"get", "list", "watch"}, role["metadata"]["name"]
