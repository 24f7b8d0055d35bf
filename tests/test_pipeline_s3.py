"""Round trip through a real S3 API (moto server on 127.0.0.1): s3:// in, s3:// out, read back row by row."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchinfer_job import storage
from batchinfer_job.commit import SUCCESS_FILE, OutputExistsError, OutputStore, read_dead_letters
from batchinfer_job.local import run_local
from tests.conftest import BROKEN
from tests.helpers import make_spec

pytestmark = pytest.mark.usefixtures("local_ray")


def test_s3_to_s3_round_trip(s3, bucket: str, photo_dir: Path) -> None:
    uploaded = []
    for path in sorted(photo_dir.iterdir()):
        s3.upload_file(str(path), bucket, f"inputs/{path.name}")
        uploaded.append(f"s3://{bucket}/inputs/{path.name}")
    s3.put_object(Bucket=bucket, Key="inputs/README.txt", Body=b"not an image, not listed")

    result = run_local(make_spec(f"s3://{bucket}/inputs", f"s3://{bucket}/outputs"), on_progress=None)

    listing = s3.list_objects_v2(Bucket=bucket, Prefix="outputs/")["Contents"]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"outputs/{SUCCESS_FILE}")["Body"].read())
    shard_keys = [f"outputs/{s['file']}" for s in manifest["shards"]]
    rows = []
    for key in shard_keys:
        rows += pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()
    by_key = {row["key"]: row for row in rows}
    assert len(rows) == len(by_key) == len(uploaded)
    assert sorted(by_key) == sorted(uploaded)
    for uri, row in by_key.items():
        if uri.rsplit("/", 1)[-1] in BROKEN:
            assert row["error"].startswith("decode: ") and row["label"] is None
        else:
            assert row["error"] is None and row["label"] and len(row["top_k_scores"]) == 3

    assert manifest["counts"] == {"total": len(uploaded), "succeeded": len(uploaded) - 2, "failed": 2}
    assert result.failed == 2
    written = {o["Key"] for o in listing}
    assert set(shard_keys) <= written
    assert all(f"outputs/_shards/{s['file'].removesuffix('.parquet')}.json" in written for s in manifest["shards"])
    # _SUCCESS.json is written last.
    modified = {o["Key"]: o["LastModified"] for o in listing}
    assert modified[f"outputs/{SUCCESS_FILE}"] >= max(modified[k] for k in shard_keys)
    dead = read_dead_letters(f"s3://{bucket}/outputs").to_pylist()
    assert sorted(d["key"].rsplit("/", 1)[-1] for d in dead) == sorted(BROKEN)
    assert {d["stage"] for d in dead} == {"decode"}


@pytest.mark.parametrize("mode", ["error_if_exists", "overwrite"])
def test_an_s3_console_folder_marker_is_not_data(s3, bucket: str, mode: str) -> None:
    """The S3 console's "Create folder" leaves a zero-byte `preds/` object (and `preds/sub/` inside): an
    empty output, not foreign files (both modes once refused it, listing "()")."""
    s3.put_object(Bucket=bucket, Key="preds/", Body=b"")
    s3.put_object(Bucket=bucket, Key="preds/sub/", Body=b"")
    store = OutputStore(storage.resolve(f"s3://{bucket}/preds/"))
    assert store.prepare(mode, "f" * 16) == []
    assert storage.files_under(store.location) == ["_job.json"]
    s3.put_object(Bucket=bucket, Key="preds/notes.txt", Body=b"mine")  # a real foreign file still refuses
    with pytest.raises(OutputExistsError, match=r"holds files batchinfer did not write \(notes\.txt\)"):
        OutputStore(storage.resolve(f"s3://{bucket}/preds/")).prepare(mode, "e" * 16)


@pytest.mark.usefixtures("local_ray")
def test_a_typo_in_the_output_bucket_fails_in_one_line(s3, photo_dir: Path) -> None:
    from batchinfer_job.commit import OutputWriteError

    spec = make_spec(str(photo_dir), "s3://no-such-bucket-typo/preds/")
    with pytest.raises(OutputWriteError) as failed:
        run_local(spec, on_progress=None)
    message = str(failed.value)
    assert message.startswith("output.uri 's3://no-such-bucket-typo/preds': preparing the output failed: ")
    assert "bucket does not exist" in message and "\n" not in message


def test_demo_data_onto_s3_then_results_summarise_the_committed_output(s3, bucket: str) -> None:
    """The cluster demo's two CLI steps against a real S3 API: photos uploaded under a prefix, and a finished
    output read back (counts from _SUCCESS.json, labels per photo, the error row); no output is one clear line."""
    from typer.testing import CliRunner

    from batchinfer_operator.cli import app

    runner = CliRunner()
    uploaded = runner.invoke(app, ["demo-data", f"s3://{bucket}/images/", "--per-photo", "2"])
    assert uploaded.exit_code == 0, uploaded.output
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="images/")["Contents"])
    assert len(keys) == 8 * 2 + 1 and "images/corrupt_000.jpg" in keys and "images/chelsea_001.jpg" in keys
    assert f"wrote 17 files to s3://{bucket}/images/" in uploaded.output

    missing = runner.invoke(app, ["results", f"s3://{bucket}/predictions/"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert f"error: s3://{bucket}/predictions/ holds no _SUCCESS.json: no job has finished" in missing.output

    run_local(make_spec(f"s3://{bucket}/images/", f"s3://{bucket}/predictions/"), on_progress=None)
    shown = runner.invoke(app, ["results", f"s3://{bucket}/predictions/"])
    assert shown.exit_code == 0, shown.output
    assert f"s3://{bucket}/predictions/: 17 inputs, 16 predicted, 1 error rows" in shown.output
    assert "error rows (1):" in shown.output and "corrupt_000.jpg: decode: " in shown.output


def test_demo_data_into_a_missing_bucket_says_so_in_one_line(s3) -> None:
    from typer.testing import CliRunner

    from batchinfer_operator.cli import app

    result = CliRunner().invoke(app, ["demo-data", "s3://no-such-bucket-here/images/", "--per-photo", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "error: cannot write the photos to s3://no-such-bucket-here/images/" in result.output
