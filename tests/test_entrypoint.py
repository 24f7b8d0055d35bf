"""The RayJob entrypoint runs exactly what the operator's ConfigMap describes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from batchinfer_job.summary import read_predictions
from batchinfer_operator.render import ENTRYPOINT, SPEC_FILE, Owner, render_children
from batchinfer_operator.settings import OperatorSettings
from tests.helpers import make_spec


def test_entrypoint_runs_the_spec_from_the_rendered_configmap(tmp_path: Path, photo_dir: Path) -> None:
    spec = make_spec(str(photo_dir), str(tmp_path / "out"))  # a real model: its actor logs model_ready
    configmap = render_children(spec, Owner("e2e", "ns"), OperatorSettings())[0]
    mounted = tmp_path / "etc-batchinfer" / SPEC_FILE
    mounted.parent.mkdir()
    mounted.write_text(configmap["data"][SPEC_FILE])
    command = ENTRYPOINT.replace("/etc/batchinfer/spec.json", str(mounted)).split()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINFER_")}
    result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = json.loads(result.stdout.strip().splitlines()[-1])
    assert finished == {"event": "finished", "total": 26, "succeeded": 24, "failed": 2, "output": str(tmp_path / "out")}
    assert len(read_predictions(str(tmp_path / "out"))) == 26
    assert "model_ready device=cpu precision=" in result.stderr  # the actor's INFO lines reach the job's log


def test_entrypoint_refuses_an_invalid_spec_file_with_field_paths(tmp_path: Path) -> None:
    bad = tmp_path / "spec.json"
    bad.write_text(
        json.dumps(
            {
                "apiVersion": "batchinfer.dev/v1alpha1",
                "kind": "BatchInference",
                "metadata": {"name": "x"},
                "spec": {"model": {}},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "batchinfer_job.entrypoint", "--spec", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: spec.model: model needs exactly one of" in result.stderr
    assert "error: spec.input: Field required" in result.stderr


def test_without_a_service_account_token_the_job_runs_and_says_once_why(monkeypatch, caplog) -> None:
    """A pod whose ServiceAccount mounts no token (automountServiceAccountToken: false): no reporter, one
    warning naming the BatchInference and the reason, no crash (every attempt used to fail at start)."""
    import logging

    from batchinfer_job.status_reporter import StatusReporter

    monkeypatch.setenv("BATCHINFER_NAME", "no-token")
    monkeypatch.setenv("BATCHINFER_NAMESPACE", "ml-batch")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "198.19.0.1")  # in a pod, but /var/run/secrets/... is absent
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    with caplog.at_level(logging.WARNING):
        assert StatusReporter.in_cluster() is None
    (record,) = [r for r in caplog.records if "progress is not reported" in r.getMessage()]
    assert "ml-batch/no-token" in record.getMessage() and "token" in record.getMessage()
