"""CPU stage: read image bytes and decode them into fixed-size uint8 arrays, a whole batch per call.

A file that cannot be read or decoded becomes an error row (zeros image + reason); it never fails the job.
Resize and crop reproduce torchvision's PIL transforms exactly, so results match a plain torchvision loop.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from batchinfer_job import storage
from batchinfer_job.spec import DEFAULT_MAX_IMAGE_PIXELS

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, not a half-grey image
Image.MAX_IMAGE_PIXELS = None  # input.maxImagePixels is the limit (checked from the header in decode_image)


@dataclass(frozen=True)
class Preprocess:
    """Geometry and normalisation a model expects. Normalisation happens on the model's device."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)` geometry: the short side becomes `size`, the long side is truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_span(resized: int, crop: int) -> tuple[int, int, int]:
    """Along one axis of the resized image: (first kept pixel, pixels kept, zero padding before them),
    as torchvision's `CenterCrop` does it (rounded offsets; zero padding when the image is smaller)."""
    if resized >= crop:
        return round((resized - crop) / 2.0), crop, 0
    return 0, resized, (crop - resized) // 2


MAX_RESIZED_FACTOR = 64  # the resized image may hold at most this many crops' worth of pixels


def resize_and_crop(img: Image.Image, preprocess: Preprocess) -> Image.Image:
    """torchvision's `Resize(resize)` then `CenterCrop(crop)`, with memory bounded by the crop size.

    Where the resized image stays within MAX_RESIZED_FACTOR crops (every ordinary photo) it is made whole
    and cropped: pixel-identical to torchvision. Beyond that (a 1 x 100,000 strip would become 256 x 25.6 M)
    only the crop window is resampled, from the matching box of the source: the same geometry and filter,
    off by at most 1 in a few pixels from float rounding, in crop x crop memory.
    """
    w, h = img.size
    new_w, new_h = resized_size(w, h, preprocess.resize)
    left, keep_w, pad_left = crop_span(new_w, preprocess.crop)
    top, keep_h, pad_top = crop_span(new_h, preprocess.crop)
    if (new_w, new_h) == (w, h):
        window = img.crop((left, top, left + keep_w, top + keep_h))
    elif new_w * new_h <= MAX_RESIZED_FACTOR * preprocess.crop * preprocess.crop:
        window = img.resize((new_w, new_h), Image.Resampling.BILINEAR).crop((left, top, left + keep_w, top + keep_h))
    else:
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + keep_w) * sx, (top + keep_h) * sy)
        window = img.resize((keep_w, keep_h), Image.Resampling.BILINEAR, box=box)
    if (keep_w, keep_h) == (preprocess.crop, preprocess.crop):
        return window
    padded = Image.new(img.mode, (preprocess.crop, preprocess.crop))
    padded.paste(window, (pad_left, pad_top))
    return padded


# A progressive JPEG decodes every scan over the whole image: 40,000 scans in 2.2 MB took ~115 s. Encoders
# write about 10 (libjpeg's default progression) and rarely more than a few dozen; libjpeg-turbo's own tools
# refuse files over a -maxscans limit for this reason.
MAX_JPEG_SCANS = 100
_START_OF_SCAN = b"\xff\xda"  # entropy-coded data stuffs every 0xFF as FF 00: this pair is only ever a marker


def check_pixels(img: Image.Image, max_pixels: int, data: bytes | None = None) -> None:
    """DecompressionBombError for an image of more than input.maxImagePixels, known from its header, or (given
    its bytes) a JPEG of more than MAX_JPEG_SCANS scans, known without decoding any."""
    width, height = img.size
    if width * height > max_pixels:
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height} pixels > input.maxImagePixels {max_pixels}"
        )
    if data is not None and img.format == "JPEG":
        scans = data.count(_START_OF_SCAN)
        if scans > MAX_JPEG_SCANS:
            raise Image.DecompressionBombError(
                f"a JPEG of {scans} scans (more than {MAX_JPEG_SCANS}): decoding it would take minutes"
            )


DECODE_BLOCK_BYTES = 16 * 2**10  # data fed to the decoder between two checks of the time limit


class DecodeTimeoutError(OSError):
    """An image took longer than input.maxDecodeSeconds to decode."""


def bound_decode_time(img: Image.Image, seconds: float) -> None:
    """Make `img.load()` raise DecodeTimeoutError once it has run `seconds`: PIL feeds the decoder block by block
    through `load_read` (JPEG, PNG) or the file's `read`, and the deadline is checked before each block. The
    worst file allowed (100 scans) decodes at most one block past the deadline."""
    read = getattr(img, "load_read", None) or img.fp.read  # type: ignore[attr-defined]
    deadline = time.monotonic() + seconds

    def timed_read(size: int) -> bytes:
        if time.monotonic() > deadline:
            raise DecodeTimeoutError(f"decoding took more than input.maxDecodeSeconds={seconds:g} s")
        return read(size)

    img.decodermaxblock = DECODE_BLOCK_BYTES  # type: ignore[attr-defined]
    img.load_read = timed_read  # type: ignore[attr-defined]


def decode_image(
    data: bytes, preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_seconds: float | None = None
) -> np.ndarray:
    """Bytes → RGB uint8 array of shape (crop, crop, 3). Raises on undecodable input.

    An image of more than `max_pixels` is refused from its header, before its pixels are decoded; one that takes
    more than `max_seconds` to decode is abandoned (DecodeTimeoutError). Pure PIL (no torch import): decode
    workers start fast and stay small.
    """
    with Image.open(io.BytesIO(data)) as img:
        check_pixels(img, max_pixels, data)
        if max_seconds is not None:
            bound_decode_time(img, max_seconds)
        img.load()
        rgb = img.convert("RGB")
    return np.asarray(resize_and_crop(rgb, preprocess), dtype=np.uint8)


def _error(stage: str, err: BaseException) -> str:
    return f"{stage}: {type(err).__name__}: {err}"


DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, SyntaxError, MemoryError)
DEVICE_JPEG_MODES = ("RGB", "L")  # what nvJPEG and libjpeg-turbo turn into RGB the way PIL does
_JPEG_END = b"\xff\xd9"


def device_decodable(data: bytes, max_pixels: int) -> bool:
    """Check an image from its header without decoding it: True when it is a complete baseline-or-progressive
    RGB or greyscale JPEG the model's device can decode, False when it must take the tasks decoder (PNG, WebP,
    CMYK, a JPEG with no end marker, ...). Raises what `decode_image` raises on a file that is plainly not an
    image or has more than `max_pixels` pixels, with the same message.
    """
    with Image.open(io.BytesIO(data)) as img:
        check_pixels(img, max_pixels, data)
        complete = data.endswith(_JPEG_END) or data.rstrip(b"\0").endswith(_JPEG_END)
        return img.format == "JPEG" and img.mode in DEVICE_JPEG_MODES and complete


def read_bytes(batch: dict[str, np.ndarray], i: int, max_bytes: int | None) -> bytes:
    """Row i's encoded image: read from its `uri` or taken from its `bytes`; OSError when it cannot be had."""
    data = storage.read_uri(batch["uri"][i], max_bytes) if "uri" in batch else batch["bytes"][i]
    if data is None:
        raise EmptyImageError("empty image column")
    if max_bytes is not None and len(data) > max_bytes:
        raise storage.TooLargeError(f"{len(data)} bytes > input.maxImageBytes {max_bytes}")
    return bytes(data)


class EmptyImageError(OSError):
    """A row whose image column is null."""


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    preprocess: Preprocess,
    max_bytes: int | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Read (when rows carry `uri`) and decode a batch (each image within `max_seconds`, see `decode_image`).

    In: `key`, either `uri` (any supported storage) or `bytes`, optionally `error` (the read task's) and
    `partition` (passed through). Out: `key`, `image` uint8 (N, crop, crop, 3), `error` ("" on success: an
    all-null column would not survive Ray's Arrow round trip as strings), and `partition` when it came in.
    """
    errors = _incoming_errors(batch)
    images = np.zeros((len(errors), preprocess.crop, preprocess.crop, 3), dtype=np.uint8)
    for i, data in _readable(batch, errors, max_bytes):
        try:
            images[i] = decode_image(data, preprocess, max_pixels, max_seconds)
        except DECODE_ERRORS as err:
            errors[i] = _error("decode", err)
    return _out(batch, errors, image=images)


def _incoming_errors(batch: dict[str, np.ndarray]) -> list[str]:
    """Each row's error so far ("" for none): the read task's, when the batch carries them."""
    if "error" not in batch:
        return [""] * len(batch["key"])
    return [error_or_none(e) or "" for e in batch["error"]]


def _readable(batch: dict[str, np.ndarray], errors: list[str], max_bytes: int | None) -> Iterator[tuple[int, bytes]]:
    """(row, encoded image) for every row without an error yet; a row that cannot be read gets its read error."""
    for i, error in enumerate(errors):
        if error:
            continue
        try:
            data = read_bytes(batch, i, max_bytes)
        except storage.READ_ERRORS as err:  # this row's input alone: an error row, the job goes on
            errors[i] = "read: empty image column" if isinstance(err, EmptyImageError) else _error("read", err)
            continue
        yield i, data


def _out(batch: dict[str, np.ndarray], errors: list[str], **columns: np.ndarray) -> dict[str, Any]:
    """`key`, the stage's own columns, `error`, and `partition` passed through when it came in."""
    out = {"key": np.asarray(batch["key"], dtype=object), **columns, "error": np.asarray(errors, dtype=object)}
    if "partition" in batch:
        out["partition"] = batch["partition"]
    return out


def fetch_batch(
    batch: dict[str, np.ndarray], *, max_bytes: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> dict[str, Any]:
    """The CPU stage of compute.decode=device: read each row's bytes and check its header, decode nothing.

    In: as `decode_batch`. Out: `key`, `data` (encoded bytes; empty on an error row), `device` (True where the
    model's device can decode it, see `device_decodable`), `error` and `partition` when it came in. Rows that
    are not images, too large or too many pixels get exactly the error rows `decode_batch` gives them.
    """
    errors = _incoming_errors(batch)
    datas: list[bytes] = [b""] * len(errors)
    on_device = np.zeros(len(errors), dtype=bool)
    for i, data in _readable(batch, errors, max_bytes):
        try:
            on_device[i] = device_decodable(data, max_pixels)
        except DECODE_ERRORS as err:
            errors[i] = _error("decode", err)
            continue
        datas[i] = data
    return _out(batch, errors, data=np.asarray(datas, dtype=object), device=on_device)


def error_or_none(value: object) -> str | None:
    """The error of a row as it arrives in a batch: "", None or NaN mean none."""
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    return str(value)
