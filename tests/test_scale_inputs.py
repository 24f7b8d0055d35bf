"""Inputs at scale: partitions planned on the driver, rows read on workers, bookkeeping per partition,
manifest input, progress before the total is known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchinfer_job import inputs
from batchinfer_job.commit import CoverageError, OutputStore, read_committed, read_dead_letters
from batchinfer_job.digest import key_digest
from batchinfer_job.inputs import InputError, Partition, plan_inputs
from batchinfer_job.local import run_local
from batchinfer_job.outputs import PARTITION_COLUMN, prediction_table
from batchinfer_job.pipeline import Ledger
from batchinfer_job.progress import ProgressReport
from batchinfer_job.reading import manifest_lines
from batchinfer_job.spec import BatchInferenceSpec, InputSpec
from batchinfer_job.storage import resolve
from batchinfer_job.summary import output_summary_lines
from tests.helpers import make_spec

FAST = "batchinfer_job.examples:DominantChannelPredictor"
COLOURS = {"red": (220, 10, 10), "green": (10, 220, 10), "blue": (10, 10, 220)}


def write_photos(folder: Path, names: list[str]) -> list[Path]:
    """PNGs named `<colour>_<n>.png`, solid in that colour."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / name
        Image.new("RGB", (24, 24), COLOURS[name.split("_")[0]]).save(path, format="PNG")
        paths.append(path)
    return paths


# the plan: what the driver lists


def test_folders_are_partitions_listed_later_and_top_level_files_are_pages(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(inputs, "PAGE_FILES", 2)
    write_photos(tmp_path / "in" / "a", ["red_0.png"])
    write_photos(tmp_path / "in" / "b" / "deep", ["red_1.png"])
    write_photos(tmp_path / "in", ["green_0.png", "green_1.png", "green_2.png"])
    (tmp_path / "in" / ".cache").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    plan = plan_inputs(InputSpec(uri=str(tmp_path / "in")))
    base = str(tmp_path / "in")
    assert [(p.kind, p.id) for p in plan.partitions] == [
        ("prefix", f"{base}/a/"),
        ("prefix", f"{base}/b/"),
        ("files", f"{base}#files-0"),
        ("files", f"{base}#files-1"),
    ]
    assert [len(p.names) for p in plan.partitions[2:]] == [2, 1]
    assert sum(plan.skipped.values()) == 2  # the hidden folder (never listed) and notes.txt


def test_parquet_files_are_partitions_and_the_first_one_is_checked_on_the_driver(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"path": [f"/x/{i}.png"]}), tmp_path / "in" / f"part-{i}.parquet")
    plan = plan_inputs(InputSpec(uri=str(tmp_path / "in"), format="parquet", pathColumn="path"))
    assert [p.kind for p in plan.partitions] == ["parquet"] * 3
    with pytest.raises(inputs.InputError, match=r"input columns \['img'\] not in .*part-0\.parquet"):
        plan_inputs(InputSpec(uri=str(tmp_path / "in"), format="parquet", imageColumn="img"))


def test_a_limit_caps_the_partition_it_falls_in_and_drops_the_rest() -> None:
    partitions = [Partition(f"p{i}", "files", "/in", tuple(f"/in/{i}-{j}" for j in range(3))) for i in range(4)]
    kept = inputs._limited(partitions, 7, lambda p: [len(p.names)])
    assert [(p.id, p.cap) for p in kept] == [("p0", None), ("p1", None), ("p2", 1)]


@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 1000])
def test_manifest_byte_ranges_give_every_line_exactly_once(tmp_path: Path, chunk: int) -> None:
    lines = [f"img_{i}.png" for i in range(37)]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(lines) + "\n")
    size = manifest.stat().st_size
    ranges = [(start, min(start + chunk, size)) for start in range(0, size, chunk)]
    got = [
        line
        for start, end in ranges
        for line in manifest_lines(Partition(f"m#{start}", "manifest", str(manifest), start=start, end=end))
        if line
    ]
    assert got == lines


def test_a_manifest_is_cut_into_ranges_of_about_a_page_of_files(tmp_path: Path) -> None:
    """10,000 lines of 40 bytes: 7 ranges of ~1,640 lines, every line in exactly one (one 8 MiB range before)."""
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"/data/images/2026/12/01/img_{i:07d}.jpg\n" for i in range(10_000)))
    spec = InputSpec.model_validate({"uri": str(manifest), "format": "manifest"})
    partitions = inputs.plan_inputs(spec).partitions
    assert len(partitions) == -(-manifest.stat().st_size // inputs.MANIFEST_CHUNK_BYTES) == 7
    lines = [line for p in partitions for line in manifest_lines(p) if line]
    assert lines == manifest.read_text().splitlines()


def test_a_huge_manifest_gets_larger_ranges_not_more_than_the_cap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(inputs, "MANIFEST_MAX_RANGES", 4)
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"/in/{i:07d}.jpg\n" for i in range(100_000)))  # 1.6 MB: 25 ranges uncapped
    spec = InputSpec.model_validate({"uri": str(manifest), "format": "manifest"})
    partitions = inputs.plan_inputs(spec).partitions
    assert len(partitions) == 4
    assert sum(1 for p in partitions for line in manifest_lines(p) if line) == 100_000


# bookkeeping per partition


def _shard_table(keys: list[str], partitions: list[str]) -> pa.Table:
    import numpy as np

    count = len(keys)
    table = prediction_table(
        keys, [None] * count, np.zeros((count, 1), np.int32), np.ones((count, 1), np.float32), ["c"]
    )
    return table.append_column(PARTITION_COLUMN, pa.array(partitions, pa.string()))


def _expected(groups: dict[str, list[str]]) -> dict[str, list]:
    return {p: [len(k), f"{key_digest(k):016x}"] for p, k in groups.items()}


def test_the_same_key_in_two_partitions_is_two_inputs_and_repeats_are_removed_per_partition(tmp_path: Path) -> None:
    store = OutputStore(resolve(str(tmp_path / "out")))
    store.prepare("error_if_exists", "job")
    store.write_shard("part-aaaa-000000001", _shard_table(["k1", "k2", "k1"], ["p", "p", "q"]))
    store.write_shard("part-bbbb-000000001", _shard_table(["k2", "k3"], ["p", "q"]))  # k2 of p again: overlap
    coverage = store.exactly_once("cccc", _expected({"p": ["k1", "k2"], "q": ["k1", "k3"]}))
    assert coverage.rows == 4 and coverage.committed["p"][0] == 2
    assert sorted(read_committed_keys(store, coverage)) == ["k1", "k1", "k2", "k3"]


def read_committed_keys(store: OutputStore, coverage) -> list[str]:
    return [k for shard in coverage.shards for k in store.keys_of(shard)]


def test_a_missing_row_or_a_foreign_key_fails_the_coverage_check(tmp_path: Path) -> None:
    store = OutputStore(resolve(str(tmp_path / "out")))
    store.prepare("error_if_exists", "job")
    store.write_shard("part-aaaa-000000001", _shard_table(["k1", "kX"], ["p", "p"]))
    with pytest.raises(CoverageError, match=r"1 partitions differ from what was read: p \(2 of 2 rows, other keys\)"):
        store.exactly_once("cccc", _expected({"p": ["k1", "k2"]}))
    with pytest.raises(CoverageError, match=r"p \(2 of 3 rows\)"):
        store.exactly_once("cccc", _expected({"p": ["k1", "kX", "k3"]}))


# progress without a known total


def test_progress_shows_n_of_unknown_until_every_partition_is_read() -> None:
    ledger = Ledger(["a", "b"], earlier={"a": [3, "0"]}, actor=None)
    assert ledger.total() is None
    report = ProgressReport(processed=3, failed=0, total=ledger.total(), seconds=2.0)
    assert report.as_status()["display"] == "3/?" and report.eta_seconds is None and not report.finished
    ledger.read = {"b": [2, "0"]}
    assert ledger.total() == 5
    assert ProgressReport(3, 0, ledger.total(), 2.0).as_status()["display"] == "3/5 (60%)"


# whole runs


@pytest.mark.usefixtures("local_ray")
def test_manifest_input_reads_listed_uris_and_turns_bad_lines_into_error_rows(tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos", ["red_0.png", "green_0.png", "blue_0.png", "red_1.png"])
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "a.txt").write_text(f"../photos/red_0.png\n\n{photos[1]}\nhttp://127.0.0.1:9/x.png\n")
    rows = [{"image": str(photos[2])}, {"image": "../photos/red_1.png"}, {"other": 1}]
    (manifests / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    spec = make_spec(
        str(manifests),
        str(out),
        model={"predictor": FAST},
        input={"uri": str(manifests), "format": "manifest", "pathColumn": "image"},
        errorPolicy={"maxFailedRecords": 2},
    )
    result = run_local(spec, on_progress=None)
    assert (result.total, result.failed) == (6, 2)
    labels = {r["key"]: r["label"] for r in read_committed(str(out)).to_pylist() if r["error"] is None}
    assert labels == {"../photos/red_0.png": "red", str(photos[1]): "green", str(photos[2]): "blue",
                      "../photos/red_1.png": "red"}  # fmt: skip
    dead = {d["key"]: d["message"] for d in read_dead_letters(str(out)).to_pylist()}
    assert "listed path has unsupported scheme 'http'" in dead["http://127.0.0.1:9/x.png"]
    assert any("no string field 'image'" in m for m in dead.values())


@pytest.mark.usefixtures("local_ray")
def test_parquet_paths_are_relative_to_their_file_and_held_to_the_uri_grammar(tmp_path: Path) -> None:
    write_photos(tmp_path / "photos", ["green_0.png"])
    (tmp_path / "in").mkdir()
    paths = ["../photos/green_0.png", "http://127.0.0.1:9/x.png", "simplecache::/etc/passwd"]
    pq.write_table(pa.table({"path": paths}), tmp_path / "in" / "rows.parquet")
    spec = make_spec(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        model={"predictor": FAST},
        input={"uri": str(tmp_path / "in"), "format": "parquet", "pathColumn": "path"},
        errorPolicy={"maxFailedRecords": 2},
    )
    result = run_local(spec, on_progress=None)
    assert (result.total, result.failed) == (3, 2)
    rows = {r["key"]: r for r in read_committed(str(tmp_path / "out")).to_pylist()}
    assert rows["../photos/green_0.png"]["label"] == "green"
    assert rows["http://127.0.0.1:9/x.png"]["error"].startswith("read: InvalidPathError: listed path has unsupported")
    assert "'::'" in rows["simplecache::/etc/passwd"]["error"]


@pytest.mark.usefixtures("local_ray")
def test_duplicate_keys_in_a_parquet_file_fail_the_job_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    photo = write_photos(tmp_path / "photos", ["red_0.png"])[0]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "a"], "path": [str(photo)] * 2}), tmp_path / "in" / "rows.parquet")
    spec = make_spec(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        model={"predictor": FAST},
        input={"uri": str(tmp_path / "in"), "format": "parquet", "pathColumn": "path", "keyColumn": "id"},
    )
    with pytest.raises(
        inputs.InputError, match=r"rows\.parquet: 1 duplicate input keys; give input\.keyColumn a unique"
    ):
        run_local(spec, on_progress=None)


@pytest.mark.usefixtures("local_ray")
def test_a_huge_manifest_line_is_cut_in_what_run_prints_and_a_repeated_line_is_explained(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    huge = "missing/" + "x" * 200_000 + ".png"
    (manifests / "a.txt").write_text(huge + "\n")
    spec = make_spec(
        str(manifests),
        str(tmp_path / "out"),
        model={"predictor": FAST},
        input={"uri": str(manifests), "format": "manifest"},
        errorPolicy={"maxFailedPercent": 100},
    )
    run_local(spec, on_progress=None)
    lines = output_summary_lines(str(tmp_path / "out"))
    assert any("(200,012 characters)" in line for line in lines), lines
    assert max(len(line) for line in lines) < 400
    (manifests / "a.txt").write_text("a.png\nb.png\na.png\n")
    repeated = make_spec(
        str(manifests),
        str(tmp_path / "out2"),
        model={"predictor": FAST},
        input={"uri": str(manifests), "format": "manifest"},
    )
    with pytest.raises(InputError) as refused:
        run_local(repeated, on_progress=None)
    assert "1 duplicate input keys; list each input once (a manifest row's key is its URI" in str(refused.value)
    assert "keyColumn" not in str(refused.value)


def manifest_spec(manifests: Path, out: Path, max_failed_percent: int) -> BatchInferenceSpec:
    """The fast predictor over a folder of manifests, allowing that share of error rows."""
    return make_spec(
        str(manifests),
        str(out),
        model={"predictor": FAST},
        input={"uri": str(manifests), "format": "manifest"},
        errorPolicy={"maxFailedPercent": max_failed_percent},
    )


@pytest.mark.usefixtures("local_ray")
def test_rows_that_cannot_be_read_are_error_rows_and_the_job_goes_on(tmp_path: Path) -> None:
    """A back end that is not installed (gs://, az://), a file name that is not UTF-8, a null key or path
    in Parquet: each was a traceback that failed the whole job and committed nothing."""
    photos = write_photos(tmp_path / "photos", ["red_0.png", "green_0.png"])
    bad_name = os.fsencode(tmp_path / "photos") + b"/caf\xe9.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(open(bad_name, "wb"), format="PNG")  # noqa: SIM115
    folder = run_local(
        make_spec(str(tmp_path / "photos"), str(tmp_path / "out1"), model={"predictor": FAST}), on_progress=None
    )
    assert (folder.total, folder.failed) == (3, 1)
    (dead,) = read_dead_letters(str(tmp_path / "out1")).to_pylist()
    assert dead["key"].endswith("/caf\\xe9.png") and "not valid UTF-8; rename the file" in dead["message"]

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "list.txt").write_text(f"{photos[0]}\ngs://bucket/x.png\naz://container/y.png\n")
    manifest = manifest_spec(tmp_path / "m", tmp_path / "out2", max_failed_percent=70)
    result = run_local(manifest, on_progress=None)
    assert (result.total, result.failed) == (3, 2)
    errors = {d["key"]: d["message"] for d in read_dead_letters(str(tmp_path / "out2")).to_pylist()}
    assert "Please install gcsfs" in errors["gs://bucket/x.png"]

    (tmp_path / "pq").mkdir()
    rows = pa.table({"id": ["a", None, "c"], "path": [str(photos[0]), str(photos[1]), None]})
    pq.write_table(rows, tmp_path / "pq" / "rows.parquet")
    parquet = make_spec(
        str(tmp_path / "pq"),
        str(tmp_path / "out3"),
        model={"predictor": FAST},
        input={"uri": str(tmp_path / "pq"), "format": "parquet", "pathColumn": "path", "keyColumn": "id"},
        errorPolicy={"maxFailedPercent": 70},
    )
    result = run_local(parquet, on_progress=None)
    assert (result.total, result.failed) == (3, 2)
    errors = {d["key"]: d["message"] for d in read_dead_letters(str(tmp_path / "out3")).to_pylist()}
    assert errors[f"{tmp_path / 'pq' / 'rows.parquet'}#1"] == "input.keyColumn 'id' is null in this row"
    assert errors["c"].endswith("empty path")


@pytest.mark.usefixtures("local_ray")
def test_a_class_holds_every_uri_the_job_reads_to_its_prefixes_and_says_nothing_of_the_others(
    tmp_path: Path,
) -> None:
    """A manifest inside team-a's allowed folder once got team-b's images predicted (absolute paths, `../`,
    file://, symlinks), and its error rows told which of team-b's paths exist."""
    from batchinfer_job.classes import effective_spec, parse_class
    from batchinfer_job.reading import OUTSIDE_PREFIXES

    team_a, team_b = tmp_path / "team-a", tmp_path / "team-b"
    write_photos(team_a / "photos", ["red_0.png"])
    write_photos(team_b, ["green_0.png"])
    os.symlink(team_b / "green_0.png", team_a / "photos" / "link.png")
    (team_a / "m").mkdir()
    lines = [
        "../photos/red_0.png",  # team-a's own: predicted
        str(team_b / "green_0.png"),  # exists
        str(team_b / "missing.png"),  # does not: the same message
        "../../team-b/green_0.png",
        f"file://{team_b / 'green_0.png'}",
        "../photos/link.png",  # a symlink in team-a to team-b's file
    ]
    (team_a / "m" / "list.txt").write_text("\n".join(lines) + "\n")
    cls = parse_class(
        {
            "apiVersion": "batchinfer.dev/v1alpha1",
            "kind": "BatchInferenceClass",
            "metadata": {"name": "team-a"},
            "spec": {"limits": {"allowedInputPrefixes": [str(team_a)]}},
        }
    )
    body = manifest_spec(team_a / "m", team_a / "out", max_failed_percent=90).model_dump(mode="json", exclude_none=True)
    spec = effective_spec(body, cls)
    assert spec.input.allowedPrefixes == [str(team_a)]
    result = run_local(spec, on_progress=None)
    assert (result.total, result.failed) == (6, 5)
    errors = {d["key"]: d["message"] for d in read_dead_letters(str(team_a / "out")).to_pylist()}
    assert set(errors) == set(lines[1:])
    assert {message for message in errors.values()} == {OUTSIDE_PREFIXES.removeprefix("read: ")}


PARQUET_READ_PEAK = """
import json, resource, sys
from batchinfer_job.inputs import Partition
from batchinfer_job.reading import PartitionRead, read_partition
from batchinfer_job.spec import InputSpec
spec = InputSpec.model_validate({"uri": sys.argv[1], "format": "parquet", "imageColumn": "image", "keyColumn": "id"})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = []
for table in read_partition(Partition(sys.argv[1], "parquet", sys.argv[1]), spec, set(), PartitionRead()):
    errors = table["error"].to_pylist() if "error" in table.column_names else [None] * table.num_rows
    rows += [[key, error] for key, error in zip(table["key"].to_pylist(), errors)]
print(json.dumps(rows))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_parquet_bomb_is_refused_from_metadata_in_bounded_memory(tmp_path: Path, photo_dir: Path) -> None:
    """Four 100 MB cells of zeros (one row group each: a few hundred KB on disk) between two real photos: the bombs
    become error rows naming the column and the fix, never materialised (the read task's peak grows < 100 MB; it
    held all 400 MB before); the photos are read as usual."""
    bomb = tmp_path / "bomb.parquet"
    photo = sorted(photo_dir.glob("chelsea*"))[0].read_bytes()
    schema = pa.schema([("id", pa.string()), ("image", pa.binary())])
    with pq.ParquetWriter(bomb, schema, compression="zstd") as writer:
        writer.write_table(pa.table({"id": ["photo-0"], "image": [photo]}, schema=schema))
        for i in range(4):
            writer.write_table(pa.table({"id": [f"bomb-{i}"], "image": [bytes(100 * 2**20)]}, schema=schema))
        writer.write_table(pa.table({"id": ["photo-1"], "image": [photo]}, schema=schema))
    assert bomb.stat().st_size < 2**20
    run = subprocess.run(
        [sys.executable, "-c", PARQUET_READ_PEAK, str(bomb)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows, growth_kib = run.stdout.splitlines()[-2:]
    rows = json.loads(rows)
    assert [k for k, _ in rows] == ["photo-0", "bomb-0", "bomb-1", "bomb-2", "bomb-3", "photo-1"]
    assert [e for k, e in rows if k.startswith("photo")] == [None, None]
    refused = [e for k, e in rows if k.startswith("bomb")]
    assert all(e.startswith("read: input.imageColumn 'image' of this row group expands") for e in refused)
    assert all("not encoded images; refused unread (store JPEG/PNG/WebP bytes)" in e for e in refused)
    assert int(growth_kib) < 100 * 1024, f"the read task grew {int(growth_kib) // 1024} MB"
