"""The Argo CD health check (Lua) run with lupa against BatchInference status objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lupa import LuaRuntime

LUA = Path("manifests/argocd/health-batchinference.lua").read_text()


def health(obj: dict) -> dict:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    result = lua.execute(LUA)
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize(
    ("status", "expected", "message"),
    [
        (None, "Progressing", "Waiting for the batchinfer operator"),
        ({"phase": "Pending"}, "Progressing", "Pending"),
        ({"phase": "Running", "progress": {"display": "120/300 (40%)"}}, "Progressing", "Running 120/300 (40%)"),
        ({"phase": "Suspended"}, "Progressing", "Suspended"),
        ({"phase": "Succeeded", "progress": {"display": "300/300 (100%)"}}, "Healthy", "Succeeded 300/300 (100%)"),
        ({"phase": "Failed", "reason": "AppFailed", "message": "exit code 1"}, "Degraded", "AppFailed: exit code 1"),
        ({"phase": "Failed"}, "Degraded", "Failed: no message"),
        (
            {"phase": "Running", "conditions": [{"type": "SpecRejected", "status": "True", "message": "spec.output"}]},
            "Degraded",
            "Spec change refused: spec.output",
        ),
        (
            {"phase": "Running", "conditions": [{"type": "SpecRejected", "status": "False", "message": ""}]},
            "Progressing",
            "Running",
        ),
    ],
)
def test_health(status: dict | None, expected: str, message: str) -> None:
    obj = {"apiVersion": "batchinfer.dev/v1alpha1", "kind": "BatchInference", "metadata": {"name": "x"}}
    if status is not None:
        obj["status"] = status
    assert health(obj) == {"status": expected, "message": message}


def test_argocd_cm_patch_carries_the_same_lua() -> None:
    patch = yaml.safe_load(Path("manifests/argocd/argocd-cm-health-patch.yaml").read_text())
    assert patch["data"]["resource.customizations.health.batchinfer.dev_BatchInference"] == LUA


def test_the_app_of_apps_syncs_kuberay_then_the_chart_then_the_classes_from_paths_that_exist() -> None:
    root = yaml.safe_load(Path("manifests/argocd/app-of-apps.yaml").read_text())
    folder = Path(root["spec"]["source"]["path"])
    apps = {}
    for path in sorted(folder.glob("*.yaml")):
        app = yaml.safe_load(path.read_text())
        assert app["kind"] == "Application", path
        apps[app["metadata"]["name"]] = app
    waves = {name: int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for name, app in apps.items()}
    assert waves["kuberay-operator"] < waves["batchinfer"] < waves["batchinfer-classes"]
    assert apps["kuberay-operator"]["spec"]["source"]["targetRevision"] == "1.7.0"
    for name in ("batchinfer", "batchinfer-classes"):
        assert Path(apps[name]["spec"]["source"]["path"]).is_dir(), name
    assert "batchinfer-classes" in apps and Path("manifests/samples/classes/cpu-default.yaml").exists()
