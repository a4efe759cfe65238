"""Text-to-image precision@k of a CLIP encoder, computed directly from the model.

    python -m services.demo.evaluate --model data/demo/model --cache data/demo/cache

This is the reference the full stack (upload -> worker -> Milvus -> query) is compared with:
every class prompt is ranked against the same image files by cosine similarity.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from services.demo.fashion import CLASS_PROMPTS, label_of, write_images


class EncoderLike(Protocol):
    """What precision_at_k needs: shared.ml.encoder.ClipEncoder has it."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def encode_files(
    encoder: EncoderLike, paths: Sequence[Path], *, batch_size: int = 64
) -> np.ndarray:
    """Unit vectors of image files (opened and converted to RGB), in batches."""
    parts = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        parts.append(encoder.encode_images(images))
    return np.concatenate(parts).astype(np.float32)


def top_k(image_vectors: np.ndarray, text_vectors: np.ndarray, *, k: int) -> np.ndarray:
    """Indices (n_texts, k) of the k images most similar to each text, best first."""
    scores = text_vectors @ image_vectors.T
    # A stable sort on the negated scores: ties keep the file order.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def precision_at_k(
    encoder: EncoderLike,
    images: Sequence[Path],
    labels: Sequence[str],
    prompts: Mapping[str, str] = CLASS_PROMPTS,
    *,
    k: int = 10,
    batch_size: int = 64,
) -> dict[str, float]:
    """For each class: the share of the top-k images for its prompt that are of that class."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if k < 1 or k > len(images):
        raise ValueError(f"k must be between 1 and {len(images)}, not {k}")
    classes = list(prompts)
    image_vectors = encode_files(encoder, images, batch_size=batch_size)
    text_vectors = encoder.encode_texts([prompts[name] for name in classes]).astype(np.float32)
    hits = top_k(image_vectors, text_vectors, k=k)
    truth = np.asarray(labels)
    return {
        name: float(np.mean(truth[row] == name)) for name, row in zip(classes, hits, strict=True)
    }


def evaluate_model(
    model: Path,
    *,
    cache_dir: Path,
    image_dir: Path | None = None,
    per_class: int = 100,
    k: int = 10,
) -> dict[str, float]:
    """Per-class precision@k of a saved model on `per_class` test images of each class."""
    from shared.ml.encoder import ClipEncoder

    where = image_dir or cache_dir / f"test-images-{per_class}"
    paths = write_images(where, cache_dir=cache_dir, per_class=per_class, split="test")
    encoder = ClipEncoder(model=str(model), device="cpu", dtype="float32")
    return precision_at_k(encoder, paths, [label_of(p) for p in paths], k=k)


def format_report(scores: Mapping[str, float], *, k: int = 10) -> str:
    """A small table: one line per class prompt, then the mean."""
    lines = [
        f"{CLASS_PROMPTS.get(name, name):32s} P@{k} {value:.2f}" for name, value in scores.items()
    ]
    lines.append(f"{'mean':32s} P@{k} {float(np.mean(list(scores.values()))):.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print per-class precision@k of a saved model on Fashion-MNIST's test split."""
    parser = argparse.ArgumentParser(prog="python -m services.demo.evaluate", description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None, help="where test PNGs go")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args(argv)
    scores = evaluate_model(
        args.model, cache_dir=args.cache, image_dir=args.images, per_class=args.per_class, k=args.k
    )
    print(format_report(scores, k=args.k))


if __name__ == "__main__":
    main()
