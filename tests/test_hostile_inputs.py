"""Hostile and careless inputs: nothing is lost, nothing foreign runs, every refusal is one clear line.

Each test names the finding of the hostile-input review it covers (1-9).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from batchinfer_job import storage
from batchinfer_job.commit import OutputExistsError, OutputStore, is_own_file
from batchinfer_job.decode import Preprocess, decode_batch
from batchinfer_job.documents import MAX_DOCUMENT_BYTES
from batchinfer_job.local import LOCAL_RAY_ENV
from batchinfer_operator.cli import app
from tests.helpers import document

runner = CliRunner()
PREDICTOR = "batchinfer_job.examples:DominantChannelPredictor"
BATCHINFER = Path(sys.executable).parent / "batchinfer"  # the console script users run


def spec_body(input_uri: str, output_uri: str, **extra: object) -> dict:
    body = {
        "model": {"predictor": PREDICTOR},
        "input": {"uri": input_uri},
        "output": {"uri": output_uri, "mode": "overwrite"},
        "compute": {"device": "cpu"},
    }
    body.update(extra)
    return body


def write_doc(path: Path, spec: dict, name: str = "hostile") -> Path:
    path.write_text(yaml.safe_dump(document(spec, name)))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) with a digest of its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`batchinfer ARGS` as a user runs it, in `cwd`."""
    env = {**os.environ, **LOCAL_RAY_ENV}
    command = [str(BATCHINFER), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def assert_refused(result, *expected: str) -> None:
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    assert result.exit_code if hasattr(result, "exit_code") else result.returncode, output
    assert "Traceback" not in output, output
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A project folder: a few photos, notes beside them, and a README, as a user's working directory."""
    project = tmp_path / "home" / "project"
    images = project / "images"
    images.mkdir(parents=True)
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        Image.new("RGB", (64, 48), colour).save(images / f"img_{i}.png")
    (images / "notes.txt").write_text("keep me")
    (project / "README.md").write_text("my project")
    return project


# 1. output.mode: overwrite deletes only what batchinfer wrote


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("images", "is input.uri"),
        ("images/predictions", "lies inside input.uri"),
        (".", "contains input.uri"),
        ("..", "contains input.uri"),
        ("../..", "contains input.uri"),
        ("/", "contains input.uri"),
    ],
)
def test_overwrite_never_targets_the_input_or_above_it(workdir: Path, output: str, message: str) -> None:
    spec = write_doc(workdir / "spec.yaml", spec_body("images", output))
    before = snapshot(workdir.parent.parent)
    for command in ("validate", "run"):
        assert_refused(cli([command, "spec.yaml"], cwd=workdir), "output.uri", message)
    assert snapshot(workdir.parent.parent) == before
    assert spec.exists()


@pytest.mark.parametrize(
    ("output", "message"),
    [(".", "is the working directory"), ("..", "lies above the working directory")],
)
def test_overwrite_never_targets_the_working_directory(workdir: Path, output: str, message: str) -> None:
    elsewhere = workdir.parent.parent / "data"  # neither inside nor above the output
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "a.png")
    write_doc(workdir / "spec.yaml", spec_body(str(elsewhere), str((workdir / output).resolve())))
    before = snapshot(workdir.parent.parent)
    for command in ("validate", "run"):
        assert_refused(cli([command, "spec.yaml"], cwd=workdir), "output.uri", message)
    assert snapshot(workdir.parent.parent) == before


def test_overwrite_never_targets_the_home_directory(workdir: Path) -> None:
    home, data = workdir.parent, workdir.parent.parent / "data"  # inputs and working directory outside home
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    write_doc(data / "spec.yaml", spec_body(str(data / "a.png"), str(home)))
    before = snapshot(workdir.parent.parent)
    result = subprocess.run(
        [str(BATCHINFER), "validate", "spec.yaml"],
        cwd=data,
        capture_output=True,
        text=True,
        env={**os.environ, **LOCAL_RAY_ENV, "HOME": str(home)},
        timeout=120,
    )
    assert_refused(result, "is the home directory")
    assert snapshot(workdir.parent.parent) == before


def test_an_existing_file_as_output_is_refused(workdir: Path) -> None:
    (workdir / "predictions.parquet").write_text("not a folder")
    write_doc(workdir / "spec.yaml", spec_body("images", "predictions.parquet"))
    before = snapshot(workdir)
    for command in ("validate", "run"):
        assert_refused(cli([command, "spec.yaml"], cwd=workdir), "is an existing file")
    assert snapshot(workdir) == before


def test_overwrite_refuses_foreign_files_and_deletes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_shards").mkdir(parents=True)
    (out / "part-0a1b2c3d-000000000.parquet").write_bytes(b"old shard")
    (out / "_shards" / "part-0a1b2c3d-000000000.json").write_text("{}")
    (out / "_SUCCESS.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "_private.csv").write_text("also mine")
    before = snapshot(out)
    store = OutputStore(storage.resolve(str(out)))
    with pytest.raises(OutputExistsError, match=r"did not write \(_private.csv, notes.txt\); nothing was deleted"):
        store.prepare("overwrite", "f" * 16)
    assert snapshot(out) == before


def test_overwrite_replaces_batchinfer_output_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_shards").mkdir(parents=True)
    (out / "_errors").mkdir()
    own = [
        "_SUCCESS.json",
        "_job.json",
        "part-0a1b2c3d-000000000.parquet",
        "part-0a1b2c3d-000000001-dedup-99aa77bb.parquet",
        "_shards/part-0a1b2c3d-000000000.json",
        "_errors/part-0a1b2c3d-000000000.parquet",
    ]
    for name in own:
        (out / name).write_text("old")
    assert all(is_own_file(n) for n in own)
    assert not any(is_own_file(n) for n in ("notes.txt", "part-x.parquet", "_shards/other.json", "sub/_job.json"))
    shards = OutputStore(storage.resolve(str(out))).prepare("overwrite", "f" * 16)
    assert shards == []
    assert sorted(snapshot(out)) == ["_job.json"]  # the new job record only; the old output is gone


def test_nothing_is_deleted_before_the_inputs_are_known(tmp_path: Path, local_ray) -> None:
    from batchinfer_job.inputs import InputError
    from batchinfer_job.pipeline import run_pipeline
    from tests.helpers import make_spec

    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS.json").write_text("{}")
    (out / "part-0a1b2c3d-000000000.parquet").write_text("earlier results")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(out)
    spec = make_spec(str(empty), str(out), output={"uri": str(out), "mode": "overwrite"})
    with pytest.raises(InputError, match="holds no inputs"):
        run_pipeline(spec)
    assert snapshot(out) == before


# 2. Bounded decode


def extreme_png(path: Path, width: int, height: int) -> Path:
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def test_an_extreme_aspect_ratio_decodes_in_bounded_memory(tmp_path: Path) -> None:
    """A 1 x 100,000 PNG (a few hundred bytes) once needed a 256 x 25.6 M intermediate (20 GB)."""
    path = extreme_png(tmp_path / "strip.png", 1, 100_000)
    assert path.stat().st_size < 2000
    probe = (
        "import numpy as np\n"
        "from batchinfer_job.decode import Preprocess, decode_batch\n"
        f"p = {str(path)!r}\n"
        "b = {'key': np.asarray([p], dtype=object), 'uri': np.asarray([p], dtype=object)}\n"
        "out = decode_batch(b, preprocess=Preprocess())\n"
        "assert out['error'][0] == '', out['error'][0]\n"
        "assert out['image'].shape == (1, 224, 224, 3) and out['image'].any()\n"
        # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork and exec)
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout.strip()) / 1024
    assert peak_mib < 400, f"decoding a 1x100000 image peaked at {peak_mib:.0f} MiB"


def test_too_many_pixels_is_an_error_row_read_from_the_header(tmp_path: Path) -> None:
    path = extreme_png(tmp_path / "big.png", 3000, 2000)
    batch = {"key": np.asarray([str(path)], dtype=object), "uri": np.asarray([str(path)], dtype=object)}
    out = decode_batch(batch, preprocess=Preprocess(), max_pixels=5_000_000)
    assert out["error"][0] == (
        "decode: DecompressionBombError: 3000x2000 = 6000000 pixels > input.maxImagePixels 5000000"
    )


def test_retries_are_finite_for_tasks_actors_and_oom_kills() -> None:
    from batchinfer_job.capacity import Capacity, fit_stages
    from batchinfer_job.inputs import Partition
    from batchinfer_job.pipeline import TASK_RETRIES, ReadPlan, build_dataset
    from batchinfer_operator.render import Owner, render_children
    from batchinfer_operator.settings import OperatorSettings
    from tests.helpers import make_spec

    assert LOCAL_RAY_ENV["RAY_task_oom_retries"] == str(TASK_RETRIES)
    spec = make_spec("/in", "/out")
    rayjob = render_children(spec, Owner("x", "ns"), OperatorSettings())[-1]
    containers = [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for container in containers:
        assert {"name": "RAY_task_oom_retries", "value": str(TASK_RETRIES)} in container["env"]

    partitions = [Partition("/in#files-0", "files", "/in", ("/in/a.png",))]
    shares = fit_stages(spec.compute, Capacity(2, 2, "test"))
    plan = build_dataset(spec, ReadPlan(partitions, {}, ledger=None), shares)._logical_plan.dag
    predict, decode = plan, plan.input_dependencies[0]
    reblock = decode.input_dependencies[0]
    read = reblock.input_dependencies[0]  # read → repartition → decode
    assert read.ray_remote_args["max_retries"] == TASK_RETRIES
    assert reblock.ray_remote_args == read.ray_remote_args  # so Ray fuses them: no task of a whole CPU between
    assert reblock.compute == read.compute  # the same bounded pool of read tasks, or Ray does not fuse them either
    assert decode.ray_remote_args["max_retries"] == TASK_RETRIES
    assert predict.ray_remote_args["max_restarts"] == TASK_RETRIES
    assert predict.ray_remote_args["max_task_retries"] == -1  # until the actor's finite restarts run out


# 3, 4, 5, 7: one real run in a hostile working directory


def test_a_hostile_folder_runs_with_every_input_and_nothing_foreign(tmp_path: Path) -> None:
    """PIL.py beside the spec (3), a file named with '::' (4), a FIFO (5), '_' and hidden files (7)."""
    work = tmp_path / "work"
    images = work / "images"
    (images / "_drafts").mkdir(parents=True)
    (images / ".cache").mkdir()
    colours = {"red.png": (220, 10, 10), "a.png::b.png": (10, 220, 10), "_under.png": (10, 10, 220)}
    colours["_drafts/green.png"] = (10, 220, 10)
    for name, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(images / name, format="PNG")
    Image.new("RGB", (32, 32)).save(images / ".hidden.png")
    Image.new("RGB", (32, 32)).save(images / ".cache" / "thumb.png")
    os.mkfifo(images / "pipe.jpg")
    (work / "PIL.py").write_text("raise ImportError('the PIL.py beside the spec was imported')\n")
    write_doc(work / "spec.yaml", spec_body("images", "predictions"))

    result = cli(["run", "spec.yaml"], cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "rows:        4" in out and "errors:      0" in out, out
    assert "skipped:     2 hidden (a name starts with '.')" in out, out
    assert "skipped:     1 not a regular file (FIFO, socket or device)" in out, out
    from batchinfer_job.summary import read_predictions

    rows = {
        Path(r["key"]).relative_to(images).as_posix(): r["label"]
        for r in read_predictions(str(work / "predictions")).to_pylist()
    }
    assert rows == {"red.png": "red", "a.png::b.png": "green", "_under.png": "blue", "_drafts/green.png": "green"}


def test_a_fifo_is_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    batch = {"key": np.asarray([str(fifo)], dtype=object), "uri": np.asarray([str(fifo)], dtype=object)}
    out = decode_batch(batch, preprocess=Preprocess())  # would block forever if it opened the FIFO
    assert out["error"][0] == f"read: NotRegularFileError: {fifo} is not a regular file"


# 4. One URI grammar


@pytest.mark.parametrize(
    ("field", "uri", "message"),
    [
        ("input", "simplecache::http://127.0.0.1:8765/", "contains '::' (a URL chain)"),
        ("output", "simplecache::memory://o", "contains '::' (a URL chain)"),
        ("output", "/tmp/out::evil", "contains '::' (a URL chain)"),
        ("input", "HTTP://x/y", "unsupported scheme 'HTTP'"),
        ("output", "memory://o", "unsupported scheme 'memory'"),
        ("output", "s3:///no-bucket", "names no bucket"),
        ("input", "gs://", "names no bucket"),
    ],
)
def test_uri_grammar_refuses_chains_odd_schemes_and_missing_buckets(
    tmp_path: Path, field: str, uri: str, message: str
) -> None:
    body = spec_body("s3://bucket/in", "s3://bucket/out")
    body[field] = {**body[field], "uri": uri}
    path = write_doc(tmp_path / "spec.yaml", body)
    for command in ("validate", "render", "run"):
        assert_refused(runner.invoke(app, [command, str(path)]), f"spec.{field}.uri", message)


def test_schemes_match_in_any_case_and_are_normalised(tmp_path: Path) -> None:
    from batchinfer_job.documents import load_batchinferences

    path = write_doc(tmp_path / "spec.yaml", spec_body("S3://bucket/in", "Gs://bucket/out"))
    spec = load_batchinferences(path)[0].spec
    assert (spec.input.uri, spec.output.uri) == ("s3://bucket/in", "gs://bucket/out")


# 6, 8. Bounded documents, no tracebacks


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9)
)


def hostile_documents(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    base = yaml.safe_dump(document(spec_body("s3://b/in", "s3://b/out")))
    cases: dict[str, tuple[bytes, str]] = {
        "alias-bomb": (
            (
                base
                + "  scheduling:\n    affinity:\n"
                + "".join("      " + line + "\n" for line in ALIAS_BOMB.splitlines())
            ).encode(),
            "anchors (&name) are not accepted",
        ),
        "anchor": (base.replace("spec:", "spec: &s", 1).encode(), "anchors (&name) are not accepted"),
        "deep": (("a: " + "[" * 1000 + "]" * 1000 + "\n").encode(), "nested deeper than 64 levels"),
        "huge": (("# " + "x" * (MAX_DOCUMENT_BYTES + 10) + "\n" + base).encode(), "the API server's limit"),
        "duplicate": (
            base.replace("  output:\n", "  output:\n    mode: error_if_exists\n", 1).encode(),
            "duplicate key 'mode'",
        ),
        "latin1": ((base + "# caf\u00e9\n").encode("latin-1"), "not UTF-8 text"),
        "utf16": (base.encode("utf-16"), "not UTF-8 text"),
        "configmap": (
            (base + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").encode(),
            "kind 'ConfigMap' is not a BatchInference",
        ),
    }
    out = {}
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(data)
        out[name] = (path, message)
    return out


@pytest.mark.parametrize("case", ["alias-bomb", "anchor", "deep", "huge", "duplicate", "latin1", "utf16", "configmap"])
def test_hostile_documents_are_refused_alike_by_validate_render_and_run(tmp_path: Path, case: str) -> None:
    path, message = hostile_documents(tmp_path)[case]
    for command in ("validate", "render", "run"):
        assert_refused(runner.invoke(app, [command, str(path)]), message)


def test_validate_of_a_device_file_reads_a_bounded_amount() -> None:
    assert_refused(runner.invoke(app, ["validate", "/dev/zero"]), "/dev/zero: not a regular file")


# 7. No silent outcomes


def test_a_predictor_that_is_not_a_class_fails_at_once(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    for ref in ("os:getpid", "os:system"):
        body = spec_body("images", "out")
        body["model"] = {"predictor": ref}
        write_doc(tmp_path / "spec.yaml", body)
        result = cli(["run", "spec.yaml"], cwd=tmp_path)
        assert_refused(result, f"PredictorContractError: model.predictor '{ref}' is a builtin_function_or_method")
        ours = [line for line in result.stderr.strip().splitlines() if "(raylet)" not in line]  # Ray's own warnings
        assert len(ours) == 1, result.stderr


@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize(
    ("predictor", "message"),
    [
        ("WrongTypePredictor", "returned list; it must return a dict with 'top_k_classes' and 'top_k_scores'"),
        ("WrongShapePredictor", "returned top_k_classes (2, 3) and top_k_scores (2, 3) for 3 rows"),
        ("UnconstructiblePredictor", "could not be constructed: RuntimeError: no model here"),
    ],
)
def test_a_predictor_that_breaks_its_contract_fails_the_job(tmp_path: Path, predictor: str, message: str) -> None:
    from batchinfer_job.pipeline import run_pipeline
    from batchinfer_job.predictor import PredictorContractError
    from tests.helpers import make_spec

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(images / f"{i}.png")
    spec = make_spec(
        str(images), str(tmp_path / "out"), model={"predictor": f"batchinfer_job.fault_predictors:{predictor}"}
    )
    with pytest.raises(PredictorContractError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_pipeline(spec)
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()


@pytest.mark.usefixtures("local_ray")
def test_a_job_in_which_every_row_failed_fails_unless_the_policy_allows_it(tmp_path: Path) -> None:
    from batchinfer_job.pipeline import AllRowsFailedError, run_pipeline
    from tests.helpers import make_spec

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"broken_{i}.jpg").write_bytes(b"not a jpeg")
    spec = make_spec(str(images), str(tmp_path / "out"), model={"predictor": PREDICTOR})
    with pytest.raises(AllRowsFailedError, match="all 3 inputs became error rows"):
        run_pipeline(spec)
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()
    allowed = make_spec(
        str(images), str(tmp_path / "out"), model={"predictor": PREDICTOR}, errorPolicy={"maxFailedPercent": 100}
    )
    assert run_pipeline(allowed).failed == 3


# 9. validate ≡ what the API server and KubeRay accept


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"activeDeadlineSeconds": 2**31},
            "spec.activeDeadlineSeconds: Input should be less than or equal to 2147483647",
        ),
        ({"ttlSecondsAfterFinished": 2**40}, "spec.ttlSecondsAfterFinished: Input should be less than or equal to"),
        ({"suspend": "yes"}, "spec.suspend: Input should be a valid boolean"),
        ({"backoffLimit": "2"}, "spec.backoffLimit: Input should be a valid integer"),
        ({"scheduling": {"nodeSelector": {f"k{i}": "v" for i in range(65)}}}, "spec.scheduling.nodeSelector"),
        ({"scheduling": {"tolerations": [{"key": f"k{i}"} for i in range(65)]}}, "spec.scheduling.tolerations"),
    ],
)
def test_validate_refuses_what_kubernetes_refuses(tmp_path: Path, patch: dict, message: str) -> None:
    path = write_doc(tmp_path / "spec.yaml", spec_body("s3://b/in", "s3://b/out", **patch))
    for command in ("validate", "render"):
        assert_refused(runner.invoke(app, [command, str(path)]), message)


def test_metadata_is_bounded_like_kubernetes(tmp_path: Path) -> None:
    doc = document(spec_body("s3://b/in", "s3://b/out"), name="x" * 64)
    doc["metadata"]["namespace"] = "n" * 64
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(path)])
    assert_refused(result, "metadata.name: String should have at most 63 characters", "metadata.namespace")


def test_symlinked_image_files_are_read_and_other_links_skipped_for_what_they_are(tmp_path: Path) -> None:
    """A symlink to an image was passed over as 'FIFO, socket or device' (and its row silently missing)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "elsewhere" / "red.png")
    os.symlink(tmp_path / "elsewhere" / "red.png", tmp_path / "in" / "red.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "in" / "gone.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "folder.png")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    listing = storage.list_inputs(storage.resolve(str(tmp_path / "in")), storage.IMAGE_SUFFIXES)
    assert listing.paths == [str(tmp_path / "in" / "red.png")]
    assert listing.skipped == {
        storage.SKIP_BROKEN_LINK: 1,
        storage.SKIP_LINKED_FOLDER: 1,
        storage.SKIP_NOT_REGULAR: 1,
    }
    assert storage.read_uri(str(tmp_path / "in" / "red.png")) == (tmp_path / "elsewhere" / "red.png").read_bytes()


def test_a_symlink_under_an_allowed_local_prefix_cannot_lead_out_of_it(tmp_path: Path) -> None:
    """input.uri or output.uri through a symlink in team-a's folder into team-b's: refused by the class, as
    the lexical check alone let it read team-b's files and overwrite team-b's predictions."""
    from batchinfer_job.classes import ClassRejected, effective_spec, parse_class

    for folder in ("team-a/in", "team-b/data", "team-b/preds"):
        (tmp_path / folder).mkdir(parents=True)
    os.symlink(tmp_path / "team-b" / "data", tmp_path / "team-a" / "in" / "shared")
    os.symlink(tmp_path / "team-b" / "preds", tmp_path / "team-a" / "out")
    os.symlink(tmp_path / "team-a" / "in", tmp_path / "team-a" / "alias")  # stays inside: fine
    team_a = str(tmp_path / "team-a")
    cls = parse_class(
        {
            "apiVersion": "batchinfer.dev/v1alpha1",
            "kind": "BatchInferenceClass",
            "metadata": {"name": "team-a"},
            "spec": {"limits": {"allowedInputPrefixes": [team_a], "allowedOutputPrefixes": [team_a]}},
        }
    )
    with pytest.raises(ClassRejected) as refused:
        effective_spec(spec_body(f"{team_a}/in/shared", f"{team_a}/out"), cls)
    assert "spec.input.uri" in str(refused.value) and "spec.output.uri" in str(refused.value)
    ok = effective_spec(spec_body(f"{team_a}/alias", f"{team_a}/preds-a"), cls)
    assert ok.input.uri == f"{team_a}/alias"


def test_a_full_disk_leaves_no_half_written_record_or_orphan_shard_and_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ENOSPC a `.tmp-` record and an uncommitted shard stayed behind in the output."""
    import errno

    import pyarrow as pa

    from batchinfer_job.commit import OutputWriteError, writing
    from batchinfer_job.outputs import PARTITION_COLUMN

    store = OutputStore(storage.resolve(str(tmp_path / "out")))
    store.prepare("error_if_exists", "f" * 16)
    from batchinfer_job.outputs import PREDICTION_SCHEMA

    rows = pa.Table.from_pylist(
        [
            {"key": "a", "predicted_class": 1, "label": "x", "confidence": 0.5, "error": None},
            {"key": "b", "error": "decode: OSError: broken"},
        ],
        schema=PREDICTION_SCHEMA,
    ).append_column(PARTITION_COLUMN, pa.array(["p", "p"]))
    real_open = store.location.fs.open

    def full(path: str, mode: str = "rb", **kwargs: object):
        if "w" in mode and storage.IN_FLIGHT in path:
            handle = real_open(path, mode, **kwargs)
            handle.write(b"{")  # part of the record reached the disk
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(store.location.fs, "open", full)
    with pytest.raises(OutputWriteError) as failed, writing(store.location, "writing shard part-1-0"):
        store.write_shard("part-abcd1234-000000000", rows)
    message = str(failed.value)
    assert "\n" not in message and "writing shard part-1-0 failed: OSError: [Errno 28] No space left" in message
    assert storage.files_under(store.location) == ["_job.json"]  # no .tmp-, no shard, no dead letters
