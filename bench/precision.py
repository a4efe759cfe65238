"""Reduced precision must not change answers: bfloat16 against float32 on a trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import ROOT, Table
from shared.encoder import ClipEncoder


def compare(
    model: Path, images: list[Path], prompts: list[str], *, dtype: str
) -> tuple[float, float, float]:
    """Mean embedding cosine (dtype vs float32), mean and worst top-10 overlap over prompts."""
    exact = ClipEncoder(model=str(model), device="cpu", dtype="float32")
    fast = ClipEncoder(model=str(model), device="cpu", dtype=dtype)
    pics = [Image.open(p).convert("RGB") for p in images]
    a = np.concatenate([exact.encode_images(pics[i : i + 64]) for i in range(0, len(pics), 64)])
    b = np.concatenate([fast.encode_images(pics[i : i + 64]) for i in range(0, len(pics), 64)])
    cos = float((a * b).sum(axis=1).mean())
    ta, tb = exact.encode_texts(prompts), fast.encode_texts(prompts)
    overlaps = []
    for qa, qb in zip(ta, tb, strict=True):
        top_a = set(np.argsort(-(a @ qa))[:10])
        top_b = set(np.argsort(-(b @ qb))[:10])
        overlaps.append(len(top_a & top_b) / 10)
    return cos, float(np.mean(overlaps)), float(np.min(overlaps))


def run(table: Table) -> None:
    """The demo's trained CLIP on 1,000 Fashion-MNIST test images: bfloat16 vs float32."""
    from services.demo.fashion import CLASS_PROMPTS, write_images
    from services.demo.train import ensure_demo_model

    cache = ROOT / "cache"
    model = ensure_demo_model(ROOT / "models" / "fashion-clip", cache_dir=cache)
    images = write_images(ROOT / "fashion", cache_dir=cache, per_class=100)
    cos, mean_overlap, worst = compare(
        model, images, list(CLASS_PROMPTS.values()), dtype="bfloat16"
    )
    table.add(
        "bfloat16 vs float32: mean embedding cosine (trained model)",
        cos,
        "",
        target=">= 0.995",
        ok=cos >= 0.995,
    )
    table.add(
        "bfloat16 vs float32: top-10 overlap, mean over class prompts",
        mean_overlap,
        "",
        target=">= 0.9",
        ok=mean_overlap >= 0.9,
    )
    table.add("bfloat16 vs float32: top-10 overlap, worst prompt", worst, "")
