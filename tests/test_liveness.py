"""A job never hangs: its stages fit the CPUs the cluster has, and a stalled job ends naming the stage that starved.

The "never hangs" issue, item 0: a Parquet input of many files with the quickstart's compute (cpusPerActor: 1,
preprocessCpus: 1) on 2 CPUs sat for minutes with an actor (1 CPU) and a paused read task (0.25 CPU) holding what a
decode task (1 CPU) needed.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from batchinfer_job.capacity import (
    MIN_DECODE_CPUS,
    Capacity,
    CapacityError,
    fit_stages,
    planned_capacity,
)
from batchinfer_job.commit import read_committed
from batchinfer_job.local import LOCAL_RAY_ENV
from batchinfer_job.spec import ComputeSpec, TimeoutsSpec
from batchinfer_job.stall import StageProgress, starved_stage
from tests.helpers import document, eventually, make_spec

QUICKSTART = Path(__file__).resolve().parents[1] / "manifests" / "samples" / "quickstart.yaml"
FAST = "batchinfer_job.examples:DominantChannelPredictor"


def quickstart_compute() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())["spec"]["compute"]


def test_the_quickstart_compute_fits_two_cpus_with_room_for_every_stage() -> None:
    shares = fit_stages(ComputeSpec.model_validate(quickstart_compute()), Capacity(2, 2, "this machine"))
    assert (shares.read_tasks, shares.read_cpus, shares.decode_cpus, shares.max_actors) == (1, 0.25, 0.75, 1)


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize(
    "compute",
    [
        {"cpusPerActor": 1, "preprocessCpus": 1},
        {"cpusPerActor": 0.5, "preprocessCpus": 2, "maxActors": 8},
        {"cpusPerActor": 1, "preprocessCpus": 0.5, "minActors": 1, "maxActors": 64},
        {"cpusPerActor": 2, "preprocessCpus": 1, "maxActors": 2},
    ],
)
def test_every_stage_can_run_beside_the_largest_actor_pool(cpus: int, compute: dict) -> None:
    spec = ComputeSpec.model_validate(compute)
    try:
        shares = fit_stages(spec, Capacity(cpus, cpus, "test"))
    except CapacityError:
        assert cpus - spec.minActors * spec.cpusPerActor < 0.5 or spec.cpusPerActor > cpus
        return
    held = shares.max_actors * shares.actor_cpus + shares.read_tasks * shares.read_cpus + shares.decode_cpus
    assert held <= cpus + 1e-9, shares
    assert MIN_DECODE_CPUS <= shares.decode_cpus <= spec.preprocessCpus
    assert spec.minActors <= shares.max_actors <= spec.maxActors


def test_stages_that_cannot_fit_are_refused_with_the_numbers() -> None:
    with pytest.raises(CapacityError, match=r"compute.cpusPerActor=4 exceeds the 2 CPUs of the largest node"):
        fit_stages(ComputeSpec(cpusPerActor=4), Capacity(8, 2, "4 worker pods x 2 CPUs"))
    with pytest.raises(CapacityError) as err:
        fit_stages(ComputeSpec(cpusPerActor=1, minActors=2, maxActors=2), Capacity(2, 2, "this machine"))
    assert str(err.value).startswith(
        "compute.minActors=2 model actors x cpusPerActor=1 leave 0 of the 2 CPUs (this machine) for reading and "
        "decoding, which need at least 0.5 (0.25 + 0.25)"
    )


def test_the_planned_capacity_is_the_workers_at_most_with_ray_rounding_cpus_up() -> None:
    spec = make_spec("/in", "/out", cluster={"workers": {"resources": {"cpu": "1500m"}}})
    assert planned_capacity(spec) == Capacity(2.0, 2.0, "1 worker pods x 2 CPUs, cluster.workers")
    autoscaled = {
        "enableInTreeAutoscaling": True,
        "workers": {"replicas": 1, "minReplicas": 0, "maxReplicas": 4, "resources": {"cpu": "8"}},
    }
    assert planned_capacity(make_spec("/in", "/out", cluster=autoscaled)).cpus == 32


SHARES = fit_stages(ComputeSpec(), Capacity(2, 2, "this machine"))


@pytest.mark.parametrize(
    ("progress", "predicted", "free", "expected"),
    [
        (StageProgress(), 0, {"CPU": 0.75}, "predict: no model actor has started (each needs 1 CPU; free now: 0.75"),
        (StageProgress(64, 0, 1, 0), 0, {"CPU": 0.0}, "predict: the model actor is still loading its model"),
        (StageProgress(64, 40, 1, 1), 32, {"CPU": 1.0}, "predict: 8 decoded rows wait for the model"),
        (StageProgress(64, 32, 1, 1), 32, {"CPU": 0.5}, "decode starved: 32 rows wait for decode"),
        (StageProgress(64, 32, 1, 1), 32, {"CPU": 1.0}, "decode: 32 rows wait for decode with 1 CPUs free"),
        (StageProgress(32, 32, 1, 1), 32, {"CPU": 1.0}, "read: no input rows wait anywhere"),
    ],
)
def test_a_stall_names_the_stage_in_front_of_which_rows_wait(
    progress: StageProgress, predicted: int, free: dict, expected: str
) -> None:
    assert starved_stage(progress, predicted, SHARES, free).startswith(expected)


def write_parquet_images(folder: Path, files: int, rows: int) -> int:
    """`files` Parquet files of `rows` rows each: an id and the bytes of a small JPEG."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buffer, "JPEG")
        jpegs.append(buffer.getvalue())
    for f in range(files):
        table = pa.table({"id": [f"{f}-{r}" for r in range(rows)], "image": [jpegs[r % 16] for r in range(rows)]})
        pq.write_table(table, folder / f"part-{f:03d}.parquet")
    return files * rows


# Ray Data's progress line: "Active & requested resources: 2.25/2 CPU, ..." (what its operators hold and ask for).
REQUESTED = re.compile(r"Active & requested resources: ([0-9.]+)/[0-9.]+ CPU")


def test_many_parquet_files_with_the_quickstart_compute_finish_on_two_cpus(tmp_path: Path) -> None:
    """The hang reproduced as users run it: `batchinfer run`, the quickstart's compute, 20 Parquet files, 2 CPUs.

    Before the fix the stages asked Ray for more CPUs than the machine has (2.25 of 2): a decode task started only
    while the read task waited on the ledger, and 300 s gave 1,512 of 20,000 rows. The subprocess timeout catches
    a hang; the requested CPUs show why.
    """
    total = write_parquet_images(tmp_path / "in", files=20, rows=300)
    spec = {
        "model": {"predictor": FAST},
        "input": {"uri": "in", "format": "parquet", "imageColumn": "image", "keyColumn": "id"},
        "output": {"uri": "out"},
        "batching": {"batchSize": 32},
        "compute": {**quickstart_compute(), "device": "cpu"},
    }
    (tmp_path / "bi.yaml").write_text(yaml.safe_dump(document(spec, "many-parquet-files")))
    batchinfer = Path(sys.executable).parent / "batchinfer"
    env = {**os.environ, **LOCAL_RAY_ENV}
    result = subprocess.run(
        [str(batchinfer), "run", "bi.yaml"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    requested = [float(x) for x in REQUESTED.findall(output)]
    assert requested and max(requested) <= os.cpu_count(), requested  # every stage fits: none waits on another
    assert "Traceback" not in output
    keys = read_committed(str(tmp_path / "out"), ["key"])["key"].to_pylist()
    assert len(keys) == len(set(keys)) == total


@pytest.mark.usefixtures("local_ray")
def test_a_stall_fails_the_job_naming_the_stage_that_starved(tmp_path: Path) -> None:
    """Something else on the cluster holds the CPUs a model actor needs: no hang, one line naming predict."""
    import ray

    from batchinfer_job.pipeline import StallError, run_pipeline
    from tests.test_reliability import write_images

    write_images(tmp_path / "in", 8)

    @ray.remote(num_cpus=1.25)
    class CpuHog:
        def ready(self) -> bool:
            return True

    hog = CpuHog.remote()  # type: ignore[attr-defined]
    ray.get(hog.ready.remote())
    try:
        spec = make_spec(
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            model={"predictor": FAST},
            timeouts={"stallSeconds": 5},
        )
        with pytest.raises(StallError) as err:
            run_pipeline(spec)
    finally:
        ray.kill(hog)
    # What is free then depends on which read or decode tasks run at that moment (0.25 or 0.75 CPU each): the
    # stage and the need are fixed, and less than the 1 CPU an actor needs is free.
    assert re.match(
        r"no prediction for 5 s \(timeouts\.stallSeconds\): predict: no model actor has started \(each needs 1 CPU; "
        r"free now: (0|0\.[0-9]+) of 2 CPUs\)",
        str(err.value),
    ), err.value
    # The stalled job's work is stopped: no read task or model actor of it takes the CPUs the hog gave back.
    eventually(lambda: ray.available_resources().get("CPU") == 2, 30, "every CPU free again")


def test_the_default_stall_bound_is_set_and_documented() -> None:
    from batchinfer_job.pipeline import DEFAULT_STALL_SECONDS

    assert DEFAULT_STALL_SECONDS == 600
    assert "default 600" in (TimeoutsSpec.model_fields["stallSeconds"].description or "")
