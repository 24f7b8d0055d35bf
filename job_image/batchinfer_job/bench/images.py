"""A fixed, seeded benchmark image set: real photos cropped and resized to ImageNet-like sizes, as JPEG."""

from __future__ import annotations

import random
from pathlib import Path

from batchinfer_job.demo_data import PHOTOS, _photo

# ImageNet's median image is about 500x375; sizes here spread around that.
SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (400, 300), (500, 500))


def make_image_set(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write `count` JPEGs (reused when already there) and return their paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) == count:
        return existing
    for old in existing:
        old.unlink()
    rng = random.Random(seed)
    bases = [_photo(name) for name in PHOTOS]
    paths = []
    for i in range(count):
        base = bases[i % len(bases)]
        w, h = base.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = base.crop((left, top, left + cw, top + ch)).resize(rng.choice(SIZES))
        path = folder / f"img_{i:06d}.jpg"
        img.save(path, quality=rng.randint(80, 95))
        paths.append(path)
    return paths
