"""The pipeline on local files: predictions match plain PyTorch, broken files become error rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from batchinfer_job.commit import SUCCESS_FILE, OutputExistsError
from batchinfer_job.local import run_local
from batchinfer_job.models import load_model, preprocess_for
from batchinfer_job.summary import read_predictions
from tests.conftest import BROKEN
from tests.helpers import make_spec

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def lite_run(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("lite") / "predictions"
    # fp32, the reference loop's arithmetic: top-1 must then match exactly. (auto may pick bf16 on an AMX host;
    # test_precision holds every precision to fp32's top-1 within a tolerance.)
    spec = make_spec(str(photo_dir), str(out))
    spec = spec.model_copy(update={"compute": spec.compute.model_copy(update={"precision": "fp32"})})
    result = run_local(spec, on_progress=None)
    return spec, result, read_predictions(str(out)).to_pylist(), out


def plain_pytorch_top1(spec, paths: list[Path]) -> dict[str, int]:
    """The reference: a plain torchvision transform + model loop, one image at a time."""
    pre = preprocess_for(spec.model)
    transform = transforms.Compose(
        [
            transforms.Resize(pre.resize),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    model = load_model(spec.model).module
    out = {}
    with torch.inference_mode():
        for path in paths:
            x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            out[str(path)] = int(model(x).argmax(dim=-1))
    return out


def test_one_row_per_input_and_manifest_agrees(lite_run, photo_dir: Path) -> None:
    _, result, rows, out = lite_run
    inputs = sorted(str(p) for p in photo_dir.iterdir())
    assert sorted(r["key"] for r in rows) == inputs
    manifest = json.loads((out / SUCCESS_FILE).read_text())
    assert manifest["counts"] == {"total": len(inputs), "succeeded": len(inputs) - 2, "failed": 2}
    assert sum(s["rows"] for s in manifest["shards"]) == len(rows)
    assert sorted(s["file"] for s in manifest["shards"]) == sorted(p.name for p in out.glob("*.parquet"))
    assert sorted(p.stem for p in (out / "_shards").glob("*.json")) == sorted(p.stem for p in out.glob("*.parquet"))
    assert result.total == len(inputs) and result.failed == 2
    # Start-up is measured: the first committed row came after the start and before the end.
    assert 0 < manifest["timeToFirstRowSeconds"] <= manifest["seconds"]
    assert result.time_to_first_row == pytest.approx(manifest["timeToFirstRowSeconds"], abs=1e-3)


def test_corrupt_and_truncated_files_become_error_rows(lite_run) -> None:
    _, _, rows, _ = lite_run
    failed = {Path(r["key"]).name: r["error"] for r in rows if r["error"] is not None}
    assert set(failed) == BROKEN
    assert all(message.startswith("decode: ") for message in failed.values())
    for row in rows:
        if row["error"] is None:
            assert row["label"] and 0 < row["confidence"] <= 1 and len(row["top_k_classes"]) == 3
        else:
            assert row["predicted_class"] is None and row["label"] is None


def test_top1_equals_plain_pytorch_loop(lite_run, photo_dir: Path) -> None:
    spec, _, rows, _ = lite_run
    good = sorted(p for p in photo_dir.iterdir() if p.name not in BROKEN)
    reference = plain_pytorch_top1(spec, good)
    pipeline = {r["key"]: r["predicted_class"] for r in rows if r["error"] is None}
    assert pipeline == reference


def test_real_photos_get_the_right_imagenet_labels(lite_run) -> None:
    _, _, rows, _ = lite_run
    cats = {"tabby", "tiger cat", "Egyptian cat"}
    chelsea = [r["label"] for r in rows if Path(r["key"]).name.startswith("chelsea_")]
    coffee = [r["label"] for r in rows if Path(r["key"]).name.startswith("coffee_")]
    assert np.mean([label in cats for label in chelsea]) >= 0.8
    assert np.mean([label in {"espresso", "cup", "coffee mug"} for label in coffee]) >= 0.8


def test_overwrite_rerun_leaves_no_duplicate_rows(photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = make_spec(str(photo_dir), str(out), input={"uri": str(photo_dir), "limit": 5})
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"mode": "overwrite"})})
    run_local(spec, on_progress=None)
    run_local(spec, on_progress=None)
    keys = [r["key"] for r in read_predictions(str(out)).to_pylist()]
    assert len(keys) == 5 and len(set(keys)) == 5


def test_error_if_exists_refuses_with_clear_message(photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"previous results")
    spec = make_spec(str(photo_dir), str(out), input={"uri": str(photo_dir), "limit": 2})
    with pytest.raises(
        OutputExistsError, match=r"output\.uri .* holds files batchinfer did not write \(old\.parquet\)"
    ):
        run_local(spec, on_progress=None)
    assert (out / "old.parquet").read_bytes() == b"previous results"  # nothing lost


@pytest.mark.parametrize("decode", ["tasks", "device"])
def test_the_decode_time_limit_reaches_every_decoder_of_a_job(tmp_path: Path, decode: str) -> None:
    """input.maxDecodeSeconds as a job sets it: a slow PNG (12 MP, hundreds of ms) under a 20 ms limit is an error
    row in the decode tasks and in the model actor's fallback decoder; the photo beside it is predicted."""
    folder = tmp_path / "in"
    folder.mkdir()
    gradient = np.linspace(0, 255, 4000, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(gradient, (3000, 1))] * 3, -1)).save(folder / "slow.png")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "red.jpg")
    out = tmp_path / "out"
    spec = make_spec(str(folder), str(out), input={"uri": str(folder), "maxDecodeSeconds": 0.02})
    spec = spec.model_copy(update={"compute": spec.compute.model_copy(update={"decode": decode})})
    run_local(spec, on_progress=None)
    rows = {Path(r["key"]).name: r for r in read_predictions(str(out)).to_pylist()}
    assert (
        rows["slow.png"]["error"] == "decode: DecodeTimeoutError: decoding took more than input.maxDecodeSeconds=0.02 s"
    )
    assert rows["red.jpg"]["error"] is None and rows["red.jpg"]["predicted_class"] is not None


def test_a_read_only_output_folder_fails_in_one_line_and_writes_nothing(photo_dir: Path, tmp_path: Path) -> None:
    """A read-only file system under output.uri (a read-only tmpfs: root ignores file permissions, not this)."""
    import os
    import subprocess

    from batchinfer_job.commit import OutputWriteError

    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root (make test runs as root)")
    out = tmp_path / "readonly"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)], check=True)
    try:
        spec = make_spec(str(photo_dir), str(out / "preds"), input={"uri": str(photo_dir), "limit": 2})
        with pytest.raises(OutputWriteError) as failed:
            run_local(spec, on_progress=None)
        message = str(failed.value)
        assert message.startswith(f"output.uri '{out / 'preds'}': preparing the output failed: ")
        assert "Read-only file system" in message and "\n" not in message
        assert os.listdir(out) == []
    finally:
        subprocess.run(["umount", str(out)], check=True)
