"""Other model and input sources: TorchScript/state_dict from a URI, a user predictor, Parquet input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import models as tvm

from batchinfer_job.local import run_local
from batchinfer_job.models import load_model
from batchinfer_job.spec import ModelSpec
from batchinfer_job.summary import read_predictions
from tests.helpers import make_spec

pytestmark = pytest.mark.usefixtures("local_ray")


def test_state_dict_and_torchscript_from_a_uri_load_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = tvm.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "state.pt")
    torch.jit.save(torch.jit.script(reference), tmp_path / "scripted.pt")
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        expected = reference(x)
        from_state = load_model(ModelSpec(weightsUri=str(tmp_path / "state.pt"), architecture="resnet18"))
        from_script = load_model(ModelSpec(weightsUri=str(tmp_path / "scripted.pt")))
        assert torch.allclose(from_state.module(x), expected, atol=1e-5)
        assert torch.allclose(from_script.module(x), expected, atol=1e-5)
    assert from_state.categories[0] == "tench"  # 1000 classes: ImageNet names


def test_a_state_dict_without_architecture_is_explained(tmp_path: Path) -> None:
    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "state.pt")
    with pytest.raises(RuntimeError, match=r"not TorchScript .*set model\.architecture"):
        load_model(ModelSpec(weightsUri=str(tmp_path / "state.pt")))


def solid(color: tuple[int, int, int], path: Path) -> Path:
    Image.new("RGB", (64, 48), color).save(path)
    return path


def test_user_predictor_class_runs_in_the_actor_pool(tmp_path: Path) -> None:
    images = tmp_path / "in"
    images.mkdir()
    solid((200, 10, 10), images / "red_000.png")
    solid((10, 10, 220), images / "blue_000.png")
    spec = make_spec(
        str(images), str(tmp_path / "out"), model={"predictor": "batchinfer_job.examples:DominantChannelPredictor"}
    )
    run_local(spec, on_progress=None)
    labels = {Path(r["key"]).name: r["label"] for r in read_predictions(str(tmp_path / "out")).to_pylist()}
    assert labels == {"red_000.png": "red", "blue_000.png": "blue"}


def test_parquet_input_with_image_bytes_and_key_column(tmp_path: Path, photo_dir: Path) -> None:
    photos = sorted(p for p in photo_dir.iterdir() if p.name.startswith("chelsea_"))[:3]
    table = pa.table(
        {
            "product_id": [f"sku-{i}" for i in range(len(photos) + 1)],
            "image_bytes": [p.read_bytes() for p in photos] + [b"not an image"],
            "unused": np.arange(len(photos) + 1),
        }
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    spec = make_spec(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        input={
            "uri": str(tmp_path / "in"),
            "format": "parquet",
            "imageColumn": "image_bytes",
            "keyColumn": "product_id",
        },
    )
    result = run_local(spec, on_progress=None)
    rows = {r["key"]: r for r in read_predictions(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == ["sku-0", "sku-1", "sku-2", "sku-3"]
    assert rows["sku-3"]["error"].startswith("decode: ") and result.failed == 1
    assert all(rows[f"sku-{i}"]["label"] in {"tabby", "tiger cat", "Egyptian cat"} for i in range(3))


def test_random_weights_survive_the_trip_to_the_actors() -> None:
    spec = make_spec("in", "out", model={"torchvision": {"name": "resnet18", "weights": "NONE"}})
    shipped = ModelSpec.model_validate(spec.model.model_dump(mode="json", exclude_none=True))
    assert shipped.torchvision.weights == "NONE"
    assert load_model(shipped).categories[0] == "tench"  # built offline, no zoo download


@pytest.mark.parametrize("architecture", ["resnet18", "regnet_x_400mf", "vit_b_16"])
def test_a_state_dict_loads_without_random_init_and_predicts_the_same(architecture: str) -> None:
    """Meta-device build where the builder allows it (RegNet computes with tensors: the ordinary build)."""

    from batchinfer_job.models import _with_weights

    reference = tvm.get_model(architecture, weights=None).eval()
    loaded = _with_weights(architecture, reference.state_dict()).eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(reference(x), loaded(x))


def test_a_predictor_module_that_exits_or_fails_on_import_is_named(tmp_path: Path, monkeypatch) -> None:
    """`venv.__main__:X` passed validate, and importing it ran venv's program (SystemExit): the job failed
    without naming the predictor."""
    from batchinfer_job.documents import SpecError, parse_spec
    from batchinfer_job.predictor import PredictorContractError, load_predictor_class

    base = {"input": {"uri": "in/"}, "output": {"uri": "out/"}}
    with pytest.raises(SpecError, match=r"model\.predictor 'venv\.__main__:X' names a __main__ module"):
        parse_spec({**base, "model": {"predictor": "venv.__main__:X"}})
    (tmp_path / "exits_on_import.py").write_text("raise SystemExit(2)\n")
    (tmp_path / "breaks_on_import.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PredictorContractError, match=r"'exits_on_import:P': importing exits_on_import raised SystemExit"
    ):
        load_predictor_class("exits_on_import:P")
    with pytest.raises(PredictorContractError, match=r"'breaks_on_import:P': .* raised ZeroDivisionError"):
        load_predictor_class("breaks_on_import:P")


def test_weights_for_another_architecture_fail_the_job_in_one_line_naming_the_fields(tmp_path: Path) -> None:
    """The ModelLoadError raised in the model actor once reached the job inside a 300-600-line ActorDiedError."""
    from batchinfer_job.pipeline import ModelActorStartError

    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    (tmp_path / "in").mkdir()
    solid((255, 0, 0), tmp_path / "in" / "red.png")
    spec = make_spec(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        model={"weightsUri": str(tmp_path / "r18.pt"), "architecture": "resnet50"},
    )
    with pytest.raises(ModelActorStartError) as failed:
        run_local(spec, on_progress=None)
    message = str(failed.value)
    assert "\n" not in message and len(message) < 1100
    assert message.startswith(
        "a model actor failed to start: ModelLoadError: model.weightsUri does not fit model.architecture 'resnet50'"
    )


def test_an_image_column_of_strings_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from batchinfer_job.inputs import InputError, plan_inputs

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"img": ["not bytes"], "n": [1]}), tmp_path / "in" / "t.parquet")
    folder = str(tmp_path / "in")
    spec = make_spec(folder, str(tmp_path / "out"), input={"uri": folder, "format": "parquet", "imageColumn": "img"})
    with pytest.raises(InputError, match=r"input\.imageColumn 'img' in .*t\.parquet is of type string; it must hold"):
        plan_inputs(spec.input)
    paths = make_spec(folder, str(tmp_path / "out"), input={"uri": folder, "format": "parquet", "pathColumn": "n"})
    with pytest.raises(InputError, match=r"input\.pathColumn 'n' .* is of type int64; it must hold paths"):
        plan_inputs(paths.input)
