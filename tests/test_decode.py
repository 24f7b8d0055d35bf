"""Decode reproduces torchvision's PIL transforms to the pixel, without importing torch in decode workers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import functional as tvf

from batchinfer_job.decode import Preprocess, decode_batch, resize_and_crop

SIZES = [(500, 375), (375, 500), (256, 256), (300, 200), (100, 80), (640, 481), (257, 999), (224, 223), (80, 3000)]


@pytest.mark.parametrize(("w", "h"), SIZES)
@pytest.mark.parametrize(("resize", "crop"), [(256, 224), (256, 256), (200, 224), (232, 224)])
def test_resize_and_crop_match_torchvision(w: int, h: int, resize: int, crop: int) -> None:
    """Only the crop window is computed, yet every pixel equals torchvision's Resize + CenterCrop."""
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    ours = np.asarray(resize_and_crop(img, Preprocess(resize=resize, crop=crop)))
    assert (ours == np.asarray(tvf.center_crop(tvf.resize(img, resize), crop))).all()


@pytest.mark.parametrize(("w", "h"), [(3, 2000), (2000, 3), (1, 900)])
def test_extreme_aspect_ratios_resample_only_the_crop(w: int, h: int) -> None:
    """Past MAX_RESIZED_FACTOR crops of pixels, only the window is resampled: within 1 of torchvision."""
    img = Image.fromarray(np.random.default_rng(w + h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    ours = np.asarray(resize_and_crop(img, Preprocess()), dtype=int)
    reference = np.asarray(tvf.center_crop(tvf.resize(img, 256), 224), dtype=int)
    assert ours.shape == reference.shape == (224, 224, 3)
    assert np.abs(ours - reference).max() <= 1


def test_oversized_input_becomes_an_error_row(tmp_path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (400, 400), (1, 2, 3)).save(path)
    batch = {"key": np.asarray([str(path)], dtype=object), "uri": np.asarray([str(path)], dtype=object)}
    out = decode_batch(batch, preprocess=Preprocess(), max_bytes=1024)
    assert out["error"][0] == "read: TooLargeError: more than input.maxImageBytes 1024 bytes"
    assert not out["image"].any()


def test_decode_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    probe = "import sys, batchinfer_job.decode; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def _jpeg(progressive: bool) -> bytes:
    import io

    out = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, "JPEG", progressive=progressive)
    return out.getvalue()


def test_a_jpeg_of_too_many_scans_is_an_error_row_in_both_decode_modes_before_any_decoding() -> None:
    """40,000 scans in 2.2 MB took ~115 s to decode while every other row waited; refused from its markers."""
    from batchinfer_job.decode import MAX_JPEG_SCANS, fetch_batch

    normal = _jpeg(progressive=True)
    assert 1 < normal.count(b"\xff\xda") <= MAX_JPEG_SCANS  # what encoders write passes
    bomb = normal[:-2] + b"\xff\xda" * (MAX_JPEG_SCANS + 100) + b"\xff\xd9"
    batch = {"key": np.array(["ok", "bomb"], dtype=object), "bytes": np.array([normal, bomb], dtype=object)}
    decoded = decode_batch(batch, preprocess=Preprocess(resize=32, crop=32))
    fetched = fetch_batch(batch)
    for errors in (decoded["error"], fetched["error"]):
        assert errors[0] == ""
        assert (
            errors[1].startswith("decode: DecompressionBombError: a JPEG of ") and "scans (more than 100)" in errors[1]
        )


def _encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    import io

    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def test_an_image_that_decodes_longer_than_the_limit_is_an_error_row_in_both_decode_modes() -> None:
    """input.maxDecodeSeconds: a 12-megapixel progressive JPEG and PNG (hundreds of ms each here) under a 10 ms
    limit become error rows — tasks decode them in CPU tasks, the device path in the actor's fallback (the PNG)
    or on the device (the JPEG: not timed there) — and the small image beside them decodes as before."""
    import torch

    from batchinfer_job.decode import DecodeTimeoutError, fetch_batch
    from batchinfer_job.device_decode import decode_on_device

    gradient = np.linspace(0, 255, 4000, dtype=np.uint8)
    big = Image.fromarray(np.stack([np.tile(gradient, (3000, 1))] * 3, -1))
    datas = [_encoded(big, "JPEG", progressive=True), _encoded(big, "PNG"), _jpeg(progressive=False)]
    batch = {"key": np.array(["jpeg", "png", "small"], dtype=object), "bytes": np.array(datas, dtype=object)}
    message = "decode: DecodeTimeoutError: decoding took more than input.maxDecodeSeconds=0.01 s"
    tasks = decode_batch(batch, preprocess=Preprocess(), max_seconds=0.01)
    assert list(tasks["error"]) == [message, message, ""]
    untimed = decode_batch(batch, preprocess=Preprocess())
    assert list(untimed["error"]) == ["", "", ""] and np.array_equal(untimed["image"][2], tasks["image"][2])

    fetched = fetch_batch(batch)
    errors = [None, None, None]
    crops = decode_on_device(
        list(fetched["data"]),
        list(fetched["device"]),
        errors,
        Preprocess(),
        torch.device("cpu"),
        10**9,
        max_seconds=0.01,
    )
    assert list(fetched["device"]) == [True, False, True]
    assert errors == [None, message, None]  # the PNG took the CPU decoder; the JPEGs were decoded as a batch
    assert np.abs(crops[2].numpy().astype(int) - tasks["image"][2].astype(int)).max() <= 2
    assert issubclass(DecodeTimeoutError, OSError)  # an error row, like every other decode error
