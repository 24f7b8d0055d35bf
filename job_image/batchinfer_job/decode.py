"""CPU stage: read image bytes and decode them into fixed-size uint8 arrays, a whole batch per call.

A file that cannot be read or decoded becomes an error row (zeros image + reason); it never fails the job.
Resize and crop reproduce torchvision's PIL transforms exactly, so results match a plain torchvision loop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from batchinfer_job import storage

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, not a half-grey image


@dataclass(frozen=True)
class Preprocess:
    """Geometry and normalisation a model expects. Normalisation happens on the model's device."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `Resize(size)` on a PIL image, to the pixel: bilinear, the long side truncated."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop(size)` on a PIL image: zero padding when smaller, rounded offsets."""
    w, h = img.size
    if size > w or size > h:
        padded = Image.new(img.mode, (max(w, size), max(h, size)))
        padded.paste(img, ((size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0))
        img, (w, h) = padded, padded.size
        if (w, h) == (size, size):
            return img
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, preprocess: Preprocess) -> np.ndarray:
    """Bytes → RGB uint8 array of shape (crop, crop, 3). Raises on undecodable input.

    Pure PIL (no torch import): decode workers start fast and stay small.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    return np.asarray(center_crop(resize_short_side(rgb, preprocess.resize), preprocess.crop), dtype=np.uint8)


def _error(stage: str, err: BaseException) -> str:
    return f"{stage}: {type(err).__name__}: {err}"


def decode_batch(
    batch: dict[str, np.ndarray], *, preprocess: Preprocess, max_bytes: int | None = None
) -> dict[str, Any]:
    """Read (when rows carry `uri`) and decode a batch.

    In: `key` and either `uri` (any supported storage) or `bytes`.
    Out: `key`, `image` uint8 (N, crop, crop, 3), `error` ("" on success: an all-null column would not
    survive Ray's Arrow round trip as strings).
    """
    keys = batch["key"]
    count = len(keys)
    images = np.zeros((count, preprocess.crop, preprocess.crop, 3), dtype=np.uint8)
    errors: list[str] = [""] * count
    for i in range(count):
        try:
            data = storage.read_uri(batch["uri"][i], max_bytes) if "uri" in batch else batch["bytes"][i]
        except OSError as err:
            errors[i] = _error("read", err)
            continue
        if data is None:
            errors[i] = "read: empty image column"
            continue
        if max_bytes is not None and len(data) > max_bytes:
            errors[i] = _error("read", storage.TooLargeError(f"{len(data)} bytes > input.maxImageBytes {max_bytes}"))
            continue
        try:
            images[i] = decode_image(bytes(data), preprocess)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
            errors[i] = _error("decode", err)
    return {"key": np.asarray(keys, dtype=object), "image": images, "error": np.asarray(errors, dtype=object)}


def error_or_none(value: object) -> str | None:
    """The error of a row as it arrives in a batch: "", None or NaN mean none."""
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    return str(value)
