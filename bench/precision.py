"""Reduced precision must not change answers: what the services run against float32 on a
trained model (bfloat16 images and texts; bfloat16 images with int8 texts, the query
service's CPU default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import ROOT, Table
from shared.ml.encoder import ClipEncoder


def compare(
    model: Path, images: list[Path], prompts: list[str], *, dtype: str, text_quant: str = "none"
) -> dict[str, float]:
    """Mean image and text embedding cosines (fast vs float32) and the mean and worst top-10
    overlap over prompts, each side searching its own image vectors with its own texts."""
    exact = ClipEncoder(model=str(model), device="cpu", dtype="float32")
    fast = ClipEncoder(model=str(model), device="cpu", dtype=dtype, text_quant=text_quant)
    pics = [Image.open(p).convert("RGB") for p in images]
    a = np.concatenate([exact.encode_images(pics[i : i + 64]) for i in range(0, len(pics), 64)])
    b = np.concatenate([fast.encode_images(pics[i : i + 64]) for i in range(0, len(pics), 64)])
    # One at a time, as a lone query is encoded (a batch would take the bfloat16 tower).
    ta = exact.encode_texts(prompts)
    tb = np.stack([fast.encode_texts([prompt])[0] for prompt in prompts])
    overlaps = []
    for qa, qb in zip(ta, tb, strict=True):
        top_a = set(np.argsort(-(a @ qa))[:10])
        top_b = set(np.argsort(-(b @ qb))[:10])
        overlaps.append(len(top_a & top_b) / 10)
    return {
        "image_cos": float((a * b).sum(axis=1).mean()),
        "text_cos": float((ta * tb).sum(axis=1).mean()),
        "overlap": float(np.mean(overlaps)),
        "worst": float(np.min(overlaps)),
    }


def run(table: Table) -> None:
    """The demo's trained CLIP on 1,000 Fashion-MNIST test images, against float32."""
    from services.demo.fashion import CLASS_PROMPTS, write_images
    from services.demo.train import ensure_demo_model

    cache = ROOT / "cache"
    model = ensure_demo_model(ROOT / "models" / "fashion-clip", cache_dir=cache)
    images = write_images(ROOT / "fashion", cache_dir=cache, per_class=100)
    prompts = list(CLASS_PROMPTS.values())
    for label, dtype, quant, cos_keys in (
        ("bfloat16", "bfloat16", "none", ("image_cos", "text_cos")),
        ("bfloat16 images, int8 texts", "bfloat16", "int8", ("text_cos",)),
    ):
        got = compare(model, images, prompts, dtype=dtype, text_quant=quant)
        for key in cos_keys:
            what = "image" if key == "image_cos" else "text"
            table.add(
                f"{label} vs float32: mean {what} embedding cosine (trained model)",
                got[key],
                "",
                target=">= 0.995",
                ok=got[key] >= 0.995,
            )
        table.add(
            f"{label} vs float32: top-10 overlap, mean over class prompts",
            got["overlap"],
            "",
            target=">= 0.9",
            ok=got["overlap"] >= 0.9,
        )
        table.add(f"{label} vs float32: top-10 overlap, worst prompt", got["worst"], "")
