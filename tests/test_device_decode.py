"""compute.decode=device on this machine's CPU: the model actor decodes, resizes and crops the batch itself.

Held to compute.decode=tasks (PIL in CPU tasks): the same pixels to rounding, the same top-1 on the quickstart
photos with pretrained EfficientNet-Lite0, and the same error rows (or successful fallbacks) for hostile files.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from batchinfer_job import device_decode
from batchinfer_job.decode import Preprocess, decode_batch, fetch_batch
from batchinfer_job.demo_data import write_demo_images, write_truncated
from batchinfer_job.local import run_local
from batchinfer_job.pipeline import decode_mode, default_batch_size
from batchinfer_job.predictor import PredictorConfig, TorchPredictor
from batchinfer_job.spec import BatchInferenceSpec
from batchinfer_job.summary import read_predictions
from tests.helpers import make_spec

PRE = Preprocess()
CPU = torch.device("cpu")


def uri_batch(paths: list[Path]) -> dict[str, np.ndarray]:
    names = np.asarray([str(p) for p in paths], dtype=object)
    return {"key": names, "uri": names}


DECODERS = {name: make() for name, make in device_decode.DECODERS.items()}  # every one: the dev venv has them all


def on_device(batch: dict[str, np.ndarray], max_pixels: int = 10**9, decoder: str = device_decode.JPEG_DECODER_NAME):
    """What the model actor makes of a batch: fetch (CPU task), then decode on the device (here the CPU)."""
    fetched = fetch_batch(batch, max_pixels=max_pixels)
    errors = [e or None for e in fetched["error"]]
    images = device_decode.decode_on_device(
        list(fetched["data"]), list(fetched["device"]), errors, PRE, CPU, max_pixels, DECODERS[decoder]
    )
    return fetched, images.numpy(), errors


def kind(error: str | None) -> str | None:
    """`stage: Type` of an error row (messages may hold object addresses)."""
    return None if not error else ":".join(error.split(":")[:2])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("hostile")
    written = write_demo_images(folder, per_photo=2, photos=("chelsea", "coffee"))
    photo = Image.open(folder / "chelsea_000.jpg").convert("RGB")
    files = {
        "truncated.jpg": (folder / "chelsea_000.jpg").read_bytes()[:4000],
        "grey.jpg": _jpeg(photo.convert("L")),
        "cmyk.jpg": _jpeg(photo.convert("CMYK")),
        "progressive.jpg": _jpeg(photo, progressive=True),
        "trailing-junk.jpg": _jpeg(photo) + b"junk after the end marker",
        "webp.webp": _encoded(photo, "WEBP"),
        "rgba.png": _encoded(photo.convert("RGBA"), "PNG"),
        "tiny.jpg": _jpeg(photo.resize((9, 7))),
        "strip.jpg": _jpeg(photo.resize((4000, 3))),
        "text.jpg": b"just some text, no image at all",
        "huge.png": _encoded(Image.new("RGB", (3000, 2000)), "PNG"),
    }
    good = bytearray(_jpeg(photo))
    good[len(good) // 2 : len(good) // 2 + 40] = bytes(range(40))  # damaged entropy-coded data
    files["damaged.jpg"] = bytes(good)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    write_truncated(folder / "coffee_001.jpg", folder / "half.jpg")
    return sorted({*written, *(folder / n for n in files), folder / "half.jpg"})


def _jpeg(img: Image.Image, **options: object) -> bytes:
    return _encoded(img, "JPEG", quality=90, **options)


def _encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_hostile_files_give_the_same_error_rows_or_fallbacks_as_tasks(hostile: list[Path], decoder: str) -> None:
    max_pixels = 5_000_000  # huge.png (6 MP) is refused from its header, as in tasks
    tasks = decode_batch(uri_batch(hostile), preprocess=PRE, max_pixels=max_pixels)
    fetched, images, errors = on_device(uri_batch(hostile), max_pixels=max_pixels, decoder=decoder)
    by_name = {p.name: i for i, p in enumerate(hostile)}
    assert [kind(e) for e in tasks["error"]] == [kind(e) for e in errors]
    expected_errors = {"corrupt_000.jpg", "text.jpg", "huge.png", "truncated.jpg", "half.jpg"}
    assert {p.name for p, e in zip(hostile, errors, strict=True) if e} == expected_errors
    assert errors[by_name["huge.png"]] == tasks["error"][by_name["huge.png"]]  # same message, named limit
    fallbacks = {p.name for p, ok, e in zip(hostile, fetched["device"], errors, strict=True) if not ok and not e}
    assert {"cmyk.jpg", "webp.webp", "rgba.png", "trailing-junk.jpg"} <= fallbacks
    for name in fallbacks:  # decoded by the tasks decoder inside the actor: identical pixels
        assert np.array_equal(images[by_name[name]], tasks["image"][by_name[name]]), name
    for name in ("grey.jpg", "progressive.jpg", "tiny.jpg", "chelsea_000.jpg", "damaged.jpg"):
        i = by_name[name]
        assert fetched["device"][i] and errors[i] is None, name
        assert np.abs(images[i].astype(int) - tasks["image"][i].astype(int)).max() <= 2, name
    strip = by_name["strip.jpg"]  # tasks resamples only the crop window of extreme strips: off by ~1
    assert np.abs(images[strip].astype(int) - tasks["image"][strip].astype(int)).mean() < 1.0


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_device_pixels_match_tasks_to_rounding(photo_dir: Path, decoder: str) -> None:
    paths = sorted(photo_dir.iterdir())
    tasks = decode_batch(uri_batch(paths), preprocess=PRE)
    fetched, images, errors = on_device(uri_batch(paths), decoder=decoder)
    decoded_here = np.asarray(fetched["device"]) & np.asarray([e is None for e in errors])
    assert decoded_here.sum() >= 16
    diff = np.abs(images[decoded_here].astype(int) - tasks["image"][decoded_here].astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01  # PIL rounds in fixed point; we in float


def test_nvimgcodec_is_preferred_then_torchcodec_then_torchvision(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unloadable(why: str) -> Callable[[], device_decode.JpegDecoder]:
        def make() -> device_decode.JpegDecoder:
            raise ImportError(why)

        return make

    assert device_decode.JPEG_DECODER_NAME == "nvimgcodec"  # what this project's image installs
    decoders = dict(device_decode.DECODERS)
    monkeypatch.setattr(device_decode, "DECODERS", decoders)
    decoders["nvimgcodec"] = unloadable("No module named 'nvidia.nvimgcodec'")
    with caplog.at_level("INFO", logger="batchinfer.device_decode"):
        assert device_decode.pick_jpeg_decoder()[0] == "torchcodec"
    assert "name=nvimgcodec" in caplog.text and "nvidia.nvimgcodec" in caplog.text
    assert "jpeg_decoder=torchcodec" in caplog.text  # the one in use, in the actor's log
    decoders["torchcodec"] = unloadable("Could not load libtorchcodec: built for another torch")
    assert device_decode.pick_jpeg_decoder()[0] == "torchvision"
    assert "built for another torch" in caplog.text


def test_the_decoder_can_be_chosen_and_a_wrong_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(device_decode.DECODER_ENV, "torchvision")
    assert device_decode.pick_jpeg_decoder()[0] == "torchvision"
    monkeypatch.setenv(device_decode.DECODER_ENV, "nvjpeg")
    with pytest.raises(ValueError, match="BATCHINFER_JPEG_DECODER='nvjpeg': use one of nvimgcodec, torchcodec"):
        device_decode.pick_jpeg_decoder()


def test_a_batch_in_bytes_decodes_like_the_same_files_by_uri(photo_dir: Path) -> None:
    paths = sorted(photo_dir.iterdir())[:8]
    by_uri = on_device(uri_batch(paths))
    batch = {"key": np.asarray([p.name for p in paths], dtype=object), "bytes": [p.read_bytes() for p in paths]}
    by_bytes = on_device(batch)
    assert np.array_equal(by_uri[1], by_bytes[1]) and by_uri[2] == by_bytes[2]


def test_images_of_many_sizes_split_into_padded_groups_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    sizes = [(300, 400), (1200, 900), (256, 256), (500, 333), (2000, 1500)]
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for w, h in sizes]
    geometries = [device_decode.geometry(w, h, PRE) for w, h in sizes]
    whole = device_decode.resize_and_crop_batch(images, geometries, PRE.crop)  # type: ignore[arg-type]
    monkeypatch.setitem(device_decode.PAD_BUDGET_BYTES, "cpu", 1)  # one image per group
    single = device_decode.resize_and_crop_batch(images, geometries, PRE.crop)  # type: ignore[arg-type]
    assert torch.equal(whole, single)
    for img, (w, h), out in zip(images, sizes, whole, strict=True):  # and each is PIL's resize + crop
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        ref = np.asarray(decode_batch({"key": ["k"], "bytes": [_encoded(pil, "PNG")]}, preprocess=PRE)["image"][0])
        assert np.abs(out.permute(1, 2, 0).numpy() - ref).max() <= 2, (w, h)


def test_auto_decodes_on_the_device_only_when_the_actor_has_a_gpu() -> None:
    cpu = make_spec("in", "out", batching={})  # batchSize unset: the defaults
    gpu = cpu.model_copy(update={"compute": cpu.compute.model_copy(update={"gpusPerActor": 1, "device": "auto"})})
    cpu_model = cpu.model_copy(update={"compute": cpu.compute.model_copy(update={"gpusPerActor": 1})})
    assert (decode_mode(cpu), decode_mode(gpu), decode_mode(cpu_model)) == ("tasks", "device", "tasks")
    forced = cpu.model_copy(update={"compute": cpu.compute.model_copy(update={"decode": "device"})})
    assert decode_mode(forced) == "device"
    assert (default_batch_size(cpu), default_batch_size(gpu)) == (16, 256)


def test_decoding_overlaps_the_model_but_model_calls_never_overlap(
    photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls at once, as Ray Data makes them with max_concurrent_calls_per_actor=2: while one batch is on the
    model (SlowPredictor, 1 s), the others are decoded; the model lock lets one batch at a time in. The later
    calls start only once the first is on the model, so a slow decode cannot hide the overlap."""
    monkeypatch.setenv("BATCHINFER_SLOW_SECONDS", "1")
    actor = TorchPredictor(PredictorConfig(model={"predictor": "batchinfer_job.fault_predictors:SlowPredictor"}))
    spans: dict[str, list[tuple[float, float]]] = {"decode": [], "model": []}
    decode, predict = actor.decode, actor._predict_batch
    on_model = threading.Event()

    def timed(name: str, fn):
        def wrapper(batch):
            start = time.monotonic()
            if name == "model":
                on_model.set()
            try:
                return fn(batch)
            finally:
                spans[name].append((start, time.monotonic()))

        return wrapper

    monkeypatch.setattr(actor, "decode", timed("decode", decode))
    monkeypatch.setattr(actor, "_predict_batch", timed("model", predict))
    paths = sorted(photo_dir.iterdir())
    batches = [fetch_batch(uri_batch(paths[i : i + 6])) for i in range(0, 24, 6)]
    tables = []
    threads = [threading.Thread(target=lambda b=b: tables.append(actor(b))) for b in batches]
    threads[0].start()
    assert on_model.wait(timeout=120), "the first batch never reached the model"
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(k for t in tables for k in t["key"].to_pylist()) == sorted(str(p) for p in paths[:24])
    model = sorted(spans["model"])
    assert len(model) == 4 and all(a[1] <= b[0] for a, b in itertools.pairwise(model))  # one at a time
    first_model = model[0]
    later_decodes = sorted(spans["decode"])[1:]
    # with decode inside the lock, every later decode would start after the first model call ends
    assert any(first_model[0] < d0 < first_model[1] for d0, _ in later_decodes)


@pytest.mark.usefixtures("local_ray")
def test_quickstart_top1_agrees_between_tasks_and_device(tmp_path: Path) -> None:
    """The quickstart as shipped (pretrained EfficientNet-Lite0, its photos), once per decode setting."""
    photos = tmp_path / "images"
    write_demo_images(photos)
    results = {}
    for mode in ("tasks", "device"):
        body = yaml.safe_load(Path("manifests/samples/quickstart.yaml").read_text())["spec"]
        body["input"]["uri"] = str(photos)
        body["output"]["uri"] = str(tmp_path / mode)
        body["compute"]["decode"] = mode
        run_local(BatchInferenceSpec.model_validate(body), on_progress=None)
        rows = read_predictions(str(tmp_path / mode)).to_pylist()
        results[mode] = {r["key"]: (r["predicted_class"], kind(r["error"])) for r in rows}
    tasks, device = results["tasks"], results["device"]
    assert tasks.keys() == device.keys() and len(tasks) == 321
    assert {k: v[1] for k, v in tasks.items()} == {k: v[1] for k, v in device.items()}  # the same error rows
    predicted = [k for k, v in tasks.items() if v[1] is None]
    agree = sum(tasks[k][0] == device[k][0] for k in predicted)
    assert agree >= 0.99 * len(predicted), f"top-1 agrees on {agree} of {len(predicted)}"


@pytest.fixture(scope="module")
def quickstart_tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchPredictor, list[Path], list]:
    """The quickstart's model (pretrained EfficientNet-Lite0) and photos, and its top-1 with the tasks decoder."""
    photos = tmp_path_factory.mktemp("quickstart")
    paths = sorted(write_demo_images(photos))
    actor = TorchPredictor(PredictorConfig(model={"packaged": "efficientnet_lite0"}, threads=2))
    tasks = decode_batch(uri_batch(paths), preprocess=actor.preprocess)
    return actor, paths, top1(actor, tasks["image"], tasks["error"])


def top1(actor: TorchPredictor, images: np.ndarray | torch.Tensor, errors) -> list:
    """Each row's top-1 class, or its error kind."""
    ok = [i for i, e in enumerate(errors) if not e]
    classes = np.concatenate([actor.predict_uint8(images[ok[i : i + 64]])[0][:, 0] for i in range(0, len(ok), 64)])
    by_row = dict(zip(ok, classes.tolist(), strict=True))
    return [by_row.get(i, kind(e)) for i, e in enumerate(errors)]


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_quickstart_top1_agrees_with_tasks_for_every_decoder(quickstart_tasks, decoder: str) -> None:
    """Each decoder in the model actor as Ray would run it, without Ray: the same error rows, top-1 >= 99 %."""
    actor, paths, tasks = quickstart_tasks
    _, images, errors = on_device(uri_batch(paths), decoder=decoder)
    device = top1(actor, torch.from_numpy(images), errors)
    assert len(paths) == 321 and [c for c in tasks if isinstance(c, str)] == [c for c in device if isinstance(c, str)]
    predicted = [i for i, c in enumerate(tasks) if not isinstance(c, str)]
    agree = sum(tasks[i] == device[i] for i in predicted)
    assert agree >= 0.99 * len(predicted), f"{decoder}: top-1 agrees on {agree} of {len(predicted)}"


PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
import torch
from batchinfer_job import device_decode
from batchinfer_job.decode import Preprocess
data = Path(sys.argv[1]).read_bytes()
count = int(sys.argv[2])
device_decode.decode_on_device([data] * 2, [True] * 2, [None] * 2, Preprocess(), torch.device("cpu"), 10**9)  # warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = [None] * count
device_decode.decode_on_device([data] * count, [True] * count, errors, Preprocess(), torch.device("cpu"), 10**9)
assert errors == [None] * count, errors
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_device_decode_memory_does_not_grow_with_the_batch(tmp_path: Path) -> None:
    """Batches of 24-megapixel JPEGs (72 MB each decoded; the CPU's per-call budget holds one): the peak for 6 of
    them stays within 60 MB of the peak for 2 (decoding the whole batch at once added 258 MB)."""
    big = tmp_path / "big.jpg"
    gradient = np.linspace(0, 255, 6000, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(gradient, (4000, 1)), np.tile(gradient[::-1], (4000, 1)), np.full((4000, 6000), 90, np.uint8)], -1
    )
    Image.fromarray(pixels).save(big, quality=85)
    assert device_decode.DECODE_PIXEL_BUDGET["cpu"] < 6000 * 4000 * 2  # two never share a call

    def peak_growth_kib(count: int) -> int:
        run = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(big), str(count)], capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return int(run.stdout.split()[-1])

    two, six = peak_growth_kib(2), peak_growth_kib(6)
    assert six - two < 60 * 1024, f"peak grew {(six - two) // 1024} MB from 2 to 6 images"
