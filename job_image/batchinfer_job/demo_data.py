"""Build the quickstart's input folder: real photos from scikit-image, varied, plus broken files.

File names keep the source photo's name (`chelsea_017.jpg`) so predictions can be checked by eye.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PHOTOS = (
    "chelsea",
    "coffee",
    "rocket",
    "astronaut",
    "coins",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
)


def _photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    return Image.fromarray(np.asarray(array)).convert("RGB")


def _variant(img: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop (60-100 % of each side), maybe mirrored, resized to an ImageNet-like size."""
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    scale = rng.uniform(0.7, 1.6)
    return out.resize((max(32, int(cw * scale)), max(32, int(ch * scale))), Image.Resampling.BILINEAR)


def write_demo_images(
    folder: Path, per_photo: int = 40, photos: tuple[str, ...] = PHOTOS, seed: int = 7, corrupt: int = 1
) -> list[Path]:
    """Write `per_photo` variants of each photo (JPEG and PNG) and `corrupt` undecodable files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for name in photos:
        base = _photo(name)
        for i in range(per_photo):
            suffix = "png" if i % 5 == 4 else "jpg"
            path = folder / f"{name}_{i:03d}.{suffix}"
            _variant(base, rng).save(path, quality=90) if suffix == "jpg" else _variant(base, rng).save(path)
            written.append(path)
    for i in range(corrupt):
        path = folder / f"corrupt_{i:03d}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG " + bytes(rng.randrange(256) for _ in range(64)))
        written.append(path)
    return written


def write_truncated(source: Path, target: Path, keep: float = 0.5) -> Path:
    """A copy of an image cut after `keep` of its bytes (a half-uploaded file)."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target
