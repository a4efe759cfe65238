"""Test images made here: varied shapes, colours, sizes and formats (no downloads)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_image(seed: int, *, size: tuple[int, int] | None = None) -> Image.Image:
    """A deterministic, visually distinct RGB image for `seed`."""
    rng = random.Random(seed)
    w, h = size or (rng.randint(48, 320), rng.randint(48, 320))
    base = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 6)):
        x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
        x1, y1 = rng.randint(x0, w), rng.randint(y0, h)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return image


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    """The image's bytes in `fmt`."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_set(folder: Path, n: int, *, start: int = 0) -> list[Path]:
    """n distinct images as JPEG and PNG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        fmt, ext = ("PNG", "png") if i % 4 == 0 else ("JPEG", "jpg")
        path = folder / f"img{i:04d}.{ext}"
        path.write_bytes(encode(make_image(i), fmt))
        paths.append(path)
    return paths
