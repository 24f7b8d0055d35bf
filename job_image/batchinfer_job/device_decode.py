"""Model-actor stage of compute.decode=device: a batch of encoded images → uint8 crops on the model's device.

JPEGs the CPU stage marked decodable (`decode.device_decodable`) are decoded in one batched call on the device,
by the first decoder that loads (`pick_jpeg_decoder`): nvImageCodec (the `gpu-decode` extra: the GPU's hardware
JPEG engines where it has them, nvJPEG on its CUDA cores otherwise, libjpeg-turbo on a CPU), TorchCodec, or
torchvision.io. They are then resized and centre-cropped together: two batched matrix products with PIL's own
resampling weights for the whole batch (per-image resizes cost a kernel set each and capped a GPU below the
model's rate). Everything else — PNG, WebP, CMYK, a JPEG the device refuses or warns about — takes the tasks
decoder (`decode.decode_image`) in the actor, so a row fails or succeeds exactly as it would with
compute.decode=tasks; nothing is lost.

Pixels match the tasks path except where a sum lands within float rounding of .5 (PIL sums in fixed point):
agreement is checked on pixels and predictions, for every decoder (tests/test_device_decode.py).
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from batchinfer_job.decode import DECODE_ERRORS, Preprocess, crop_span, decode_image, resized_size

log = logging.getLogger("batchinfer.device_decode")
PAD_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}  # float32 padded images per batched resize
# Encoded images → RGB uint8 (3, H, W) on the device, None where the decoder could not decode that image.
JpegDecoder = Callable[[Sequence[bytes], torch.device], list[torch.Tensor | None]]
DECODER_ENV = "BATCHINFER_JPEG_DECODER"  # nvimgcodec | torchcodec | torchvision: use that one or fail


def nvimgcodec_decoder() -> JpegDecoder:
    """nvImageCodec: one decoder per thread and device (each decoding thread has its own CUDA stream); on a CPU
    its libjpeg-turbo backend. EXIF orientation is not applied, as PIL in the tasks decoder does not."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "1")  # errors only: an image it cannot decode is a None here
    from nvidia import nvimgcodec

    params = nvimgcodec.DecodeParams(
        apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB, sample_format=nvimgcodec.I_RGB
    )
    local = threading.local()

    def decoder_for(device: torch.device) -> nvimgcodec.Decoder:
        decoders = local.__dict__.setdefault("decoders", {})
        if device not in decoders:
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                decoders[device] = nvimgcodec.Decoder(device_id=index)
            else:
                cpu = nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)
                decoders[device] = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[cpu])
        return decoders[device]

    def decode(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            images = decoder_for(device).decode(list(datas), params=params, cuda_stream=stream.cuda_stream)
            return [None if im is None else torch.from_dlpack(im).permute(2, 0, 1) for im in images]
        images = decoder_for(device).decode(list(datas), params=params)
        return [None if im is None else torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images]

    return decode


def torchcodec_decoder() -> JpegDecoder:
    from torchcodec.decoders import decode_jpeg

    return lambda datas, device: list(decode_jpeg(_tensors(datas), mode="RGB", device=device))


def torchvision_decoder() -> JpegDecoder:
    """torchvision.io's JPEG decoder (nvJPEG on CUDA): deprecated since torchvision 0.29 for TorchCodec, kept for
    images whose torch has no matching TorchCodec build."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return lambda datas, device: list(decode_jpeg(_tensors(datas), mode=ImageReadMode.RGB, device=device))


def _tensors(datas: Sequence[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]  # writable copies


DECODERS: dict[str, Callable[[], JpegDecoder]] = {
    "nvimgcodec": nvimgcodec_decoder,
    "torchcodec": torchcodec_decoder,
    "torchvision": torchvision_decoder,
}


def pick_jpeg_decoder() -> tuple[str, JpegDecoder]:
    """The decoder named by $BATCHINFER_JPEG_DECODER, or else the first of DECODERS that loads (each one that does
    not is logged with the reason); torchvision.io, part of torchvision, always loads."""
    wanted = os.environ.get(DECODER_ENV)
    if wanted:
        if wanted not in DECODERS:
            raise ValueError(f"{DECODER_ENV}={wanted!r}: use one of {', '.join(DECODERS)}, or leave it unset")
        log.info("jpeg_decoder=%s (from %s)", wanted, DECODER_ENV)
        return wanted, DECODERS[wanted]()
    for name, make in DECODERS.items():
        try:
            decoder = make()
        except (ImportError, OSError, RuntimeError) as err:  # not installed, or built for another torch / CUDA
            log.warning("jpeg_decoder_unavailable name=%s error=%r", name, err)
            continue
        log.info("jpeg_decoder=%s", name)
        return name, decoder
    raise RuntimeError("no JPEG decoder loads (torchvision.io should): reinstall torchvision")


JPEG_DECODER_NAME, JPEG_DECODER = pick_jpeg_decoder()


@dataclass(frozen=True)
class Geometry:
    """Where torchvision's `Resize(resize)` + `CenterCrop(crop)` takes an image's crop from, per axis:
    the resized size's scale (source pixels per resized pixel) and the crop's first resized pixel."""

    scale_x: float
    scale_y: float
    left: int
    top: int


def geometry(width: int, height: int, preprocess: Preprocess) -> Geometry | None:
    """The crop's geometry; None when the crop needs zero padding (resize < crop): the tasks decoder does that."""
    new_w, new_h = resized_size(width, height, preprocess.resize)
    left, keep_w, _ = crop_span(new_w, preprocess.crop)
    top, keep_h, _ = crop_span(new_h, preprocess.crop)
    if (keep_w, keep_h) != (preprocess.crop, preprocess.crop):
        return None
    return Geometry(width / new_w, height / new_h, left, top)


def decode_jpegs(
    datas: Sequence[bytes], device: torch.device, decoder: JpegDecoder | None = None
) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) tensors on `device`, one batched call; None for an image the decoder refuses or
    warns about (corrupt data it would paper over). A decoder that refuses the whole call over one image is
    asked again image by image."""
    decoder = decoder or JPEG_DECODER
    if not datas:
        return []
    batched = _decode(decoder, datas, device)
    if batched is not None:
        return batched
    singles = [_decode(decoder, [d], device) for d in datas]
    return [None if one is None else one[0] for one in singles]


def _decode(decoder: JpegDecoder, datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None] | None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decoded = decoder(datas, device)
        except RuntimeError:
            return None
    about_data = [w for w in caught if not issubclass(w.category, DeprecationWarning)]  # not torchvision's notice
    return None if about_data else decoded


def resize_and_crop_batch(images: Sequence[torch.Tensor], geometries: Sequence[Geometry], crop: int) -> torch.Tensor:
    """Resize and crop (3, H, W) uint8 images → float (N, 3, crop, crop), as PIL's antialiased bilinear resize
    then a centre crop would, in a few batched matrix products.

    PIL's resize is separable: each output pixel is a normalised triangle-weighted sum of the source pixels
    within its support (wider when shrinking: that is the antialiasing). Only the crop's rows and columns are
    computed: out = round(Wy @ round(image @ Wx^T)), horizontal pass first and rounded between passes as PIL
    does, with weight matrices built on the device for the whole batch and zero beyond each image's edge, so
    images of any sizes share one zero-padded batch. Groups keep the padded float copy under PAD_BUDGET_BYTES.
    """
    if not images:
        return torch.zeros((0, 3, crop, crop))
    device = images[0].device
    cuts = [_cut(img, geo, crop) for img, geo in zip(images, geometries, strict=True)]
    out = torch.empty((len(images), 3, crop, crop), device=device)
    budget = PAD_BUDGET_BYTES.get(device.type, PAD_BUDGET_BYTES["cpu"])
    for group in _groups([c.pixels.shape for c in cuts], budget):
        height = max(cuts[i].pixels.shape[1] for i in group)
        width = max(cuts[i].pixels.shape[2] for i in group)
        padded = torch.zeros((len(group), 3, height, width), device=device)
        for j, i in enumerate(group):
            piece = cuts[i].pixels
            padded[j, :, : piece.shape[1], : piece.shape[2]] = piece
        params = torch.tensor([cuts[i].axes for i in group], dtype=torch.float32, device=device)
        wy = _weights(params[:, 3:], crop, height)  # (G, crop, H)
        wx = _weights(params[:, :3], crop, width)  # (G, crop, W)
        across = (padded @ wx.unsqueeze(1).transpose(-1, -2)).round_().clamp_(0, 255)  # PIL's first pass
        out[group] = (wy.unsqueeze(1) @ across).round_().clamp_(0, 255)
    return out


@dataclass(frozen=True)
class _Cut:
    pixels: torch.Tensor  # the rows and columns of the image the crop's filters read (a view)
    axes: tuple[float, ...]  # per axis (x, then y): scale, the first crop pixel's centre in the cut, cut size


def _cut(image: torch.Tensor, geo: Geometry, crop: int) -> _Cut:
    height, width = image.shape[1:]
    spans = []
    for size, scale, first in ((width, geo.scale_x, geo.left), (height, geo.scale_y, geo.top)):
        support = max(scale, 1.0)  # the triangle's half-width in source pixels
        lo = max(0, math.floor(first * scale - support) - 1)
        hi = min(size, math.ceil((first + crop) * scale + support) + 1)
        spans.append((lo, hi, (scale, (first + 0.5) * scale - lo, hi - lo)))
    (x0, x1, ax), (y0, y1, ay) = spans
    return _Cut(image[:, y0:y1, x0:x1], (*ax, *ay))


def _weights(axis: torch.Tensor, crop: int, length: int) -> torch.Tensor:
    """PIL's bilinear resampling weights (G, crop, length) for G images' axis parameters (scale, first centre,
    size): triangle of half-width max(scale, 1) around each output pixel's centre, normalised, and zero at and
    beyond the image's size."""
    scale, first, size = axis[:, 0:1], axis[:, 1:2], axis[:, 2:3]
    centres = first + scale * torch.arange(crop, device=axis.device, dtype=axis.dtype)  # (G, crop)
    support = scale.clamp(min=1.0).unsqueeze(-1)
    positions = torch.arange(length, device=axis.device, dtype=axis.dtype) + 0.5
    weights = (1 - ((positions - centres.unsqueeze(-1)) / support).abs()).clamp_(min=0)
    weights *= positions < size.unsqueeze(-1)
    return weights / weights.sum(-1, keepdim=True)


def _groups(shapes: Sequence[torch.Size], budget: int) -> list[list[int]]:
    """Indices in groups whose padded float32 batch stays within `budget` bytes (at least one image each)."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][1] * shapes[i][2], reverse=True)
    groups: list[list[int]] = []
    height = width = 0
    for i in order:
        h, w = max(height, shapes[i][1]), max(width, shapes[i][2])
        if groups and (len(groups[-1]) + 1) * 3 * h * w * 4 <= budget:
            groups[-1].append(i)
            height, width = h, w
        else:
            groups.append([i])
            height, width = shapes[i][1], shapes[i][2]
    return groups


# Decoded pixels one decode call may hold (RGB uint8: 3 bytes each) before they are resized and cropped: what a
# batch of ordinary photos needs in one call (256 x 0.19 MP = 48 MP), while a batch of 100-megapixel JPEGs is
# decoded a few (or one) at a time, so the actor's memory no longer grows with the batch.
DECODE_PIXEL_BUDGET = {"cuda": 1 << 27, "cpu": 1 << 25}  # 134 MP (402 MB) on a GPU, 33.5 MP (100 MB) on a CPU


def decode_on_device(
    datas: Sequence[bytes],
    on_device: Sequence[bool],
    errors: list[str | None],
    preprocess: Preprocess,
    device: torch.device,
    max_pixels: int,
    decoder: JpegDecoder | None = None,
    *,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """uint8 (N, crop, crop, 3) crops on `device` for a batch; fills `errors` for rows that cannot be decoded.

    Rows already holding an error stay zeros. Rows marked `on_device` are decoded and resized on the device, in
    calls of at most DECODE_PIXEL_BUDGET decoded pixels (an image over it alone), each resized and cropped before
    the next is decoded; the others, and any the device refuses, go through `decode_image` (the tasks decoder)
    on the CPU, one at a time, each within `max_seconds`.
    """
    crop = preprocess.crop
    out = torch.zeros((len(datas), crop, crop, 3), dtype=torch.uint8, device=device)
    candidates = [i for i, ok in enumerate(on_device) if ok and errors[i] is None]
    fallback = [i for i, ok in enumerate(on_device) if not ok and errors[i] is None]
    budget = DECODE_PIXEL_BUDGET.get(device.type, DECODE_PIXEL_BUDGET["cpu"])
    for call in pixel_groups([datas[i] for i in candidates], budget):
        rows = [candidates[j] for j in call]
        fallback += _decode_and_crop(datas, rows, out, preprocess, device, decoder)
    for i in fallback:
        try:
            decoded = decode_image(datas[i], preprocess, max_pixels, max_seconds)
            out[i] = torch.tensor(decoded, device=device)
        except DECODE_ERRORS as err:
            errors[i] = f"decode: {type(err).__name__}: {err}"
    return out


def pixel_groups(datas: Sequence[bytes], budget: int) -> list[list[int]]:
    """Indices of `datas` (device-decodable JPEGs) in order, in groups of at most `budget` pixels by their headers;
    an image over the budget makes a group of its own."""
    groups: list[list[int]] = []
    total = budget
    for i, data in enumerate(datas):
        with Image.open(io.BytesIO(data)) as img:  # the header only
            pixels = img.width * img.height
        if groups and total + pixels <= budget:
            groups[-1].append(i)
            total += pixels
        else:
            groups.append([i])
            total = pixels
    return groups


def _decode_and_crop(
    datas: Sequence[bytes],
    rows: list[int],
    out: torch.Tensor,
    preprocess: Preprocess,
    device: torch.device,
    decoder: JpegDecoder | None,
) -> list[int]:
    """Decode `rows` in one call, resize and crop them into `out`; returns the rows left to the tasks decoder."""
    left, kept, images, geometries = [], [], [], []
    for i, image in zip(rows, decode_jpegs([datas[i] for i in rows], device, decoder), strict=True):
        geo = None if image is None else geometry(image.shape[2], image.shape[1], preprocess)
        if image is None or geo is None:
            left.append(i)
            continue
        kept.append(i)
        images.append(image)
        geometries.append(geo)
    if kept:
        crops = resize_and_crop_batch(images, geometries, preprocess.crop)
        out[kept] = crops.to(torch.uint8).permute(0, 2, 3, 1)  # already rounded and clamped
    return left
