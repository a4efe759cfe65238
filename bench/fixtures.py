"""What the benchmarks run on: ImageNet-like JPEGs and CLIP checkpoints, built locally once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from services.demo.tokenizer import build_processor
from tests.support.tinymodel import build_tiny_clip


def photo_like(seed: int, *, size: tuple[int, int] = (500, 375)) -> bytes:
    """A JPEG of about 100 KB at about 500x375: smooth colour fields, shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 200)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 16, (h, w, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=92)
    return out.getvalue()


def jpeg_set(folder: Path, n: int, *, first_seed: int = 0) -> list[Path]:
    """n photo-like JPEGs in `folder` (made once, reused); seeds from `first_seed`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo{first_seed + i:06d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.exists():
            path.write_bytes(photo_like(first_seed + i))
    return paths


def tiny_png_set(folder: Path, n: int, *, first_seed: int = 0) -> list[Path]:
    """n distinct 32x32 PNGs (the pipeline-ceiling load: decoding and the model cost ~0)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"t{first_seed + i:06d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.exists():
            seed = first_seed + i
            rgb = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(path, "PNG")
    return paths


def vit_b32(folder: Path) -> Path:
    """A randomly initialised CLIPModel(CLIPConfig()) (ViT-B/32 shape) with a CLIP processor."""
    marker = folder / "bench.json"
    if marker.exists():
        return folder
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(folder)
    build_processor(folder, image_size=224).save_pretrained(folder)
    marker.write_text(json.dumps({"shape": "ViT-B/32", "weights": "random, seed 0"}))
    return folder


def tiny(folder: Path) -> Path:
    """The test suite's tiny CLIP (64 px input), for the pipeline ceiling."""
    if not (folder / "config.json").exists():
        build_tiny_clip(folder)
    return folder
