"""Train the demo's small CLIP on Fashion-MNIST, contrastively, on the CPU in a few minutes.

    python -m services.demo.train --out data/demo/model --cache data/demo/cache [--steps N]

The checkpoint is a plain `transformers.CLIPModel` plus `CLIPProcessor` (real CLIP tokenizer,
CLIP image processor at the vision tower's size) saved with save_pretrained, so
`shared.ml.encoder.ClipEncoder(model=str(out))` loads it like any CLIP checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.demo.fashion import CLASS_PROMPTS, CLASSES, IMAGE_SIZE, load_split, to_image
from services.demo.tokenizer import build_processor

log = logging.getLogger(__name__)

VERSION = 1  # bump when the recipe changes, so cached demo models are retrained
MARKER = "demo-model.json"
DEFAULT_STEPS = 1000

# Noun phrases per class; the first one is what CLASS_PROMPTS asks for ("a photo of " + it).
PHRASES: dict[str, tuple[str, ...]] = {
    "T-shirt/top": ("a t-shirt", "a top", "a tee", "a t-shirt or top", "a tshirt"),
    "Trouser": ("trousers", "a pair of trousers", "pants", "a pair of pants", "jeans"),
    "Pullover": ("a pullover", "a sweater", "a jumper", "a knitted pullover"),
    "Dress": ("a dress", "a summer dress", "a long dress"),
    "Coat": ("a coat", "a jacket", "a winter coat"),
    "Sandal": ("a sandal", "sandals", "a pair of sandals"),
    "Shirt": ("a shirt", "a button-up shirt", "a blouse", "a collared shirt"),
    "Sneaker": ("a sneaker", "sneakers", "a trainer", "a running shoe"),
    "Bag": ("a bag", "a handbag", "a purse"),
    "Ankle boot": ("an ankle boot", "a boot", "ankle boots"),
}
TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "{}",
    "a picture of {}",
    "an image of {}",
    "a product photo of {}",
    "a black and white photo of {}",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (recorded in the marker file)."""

    steps: int = DEFAULT_STEPS
    seed: int = 0
    batch_size: int = 256
    lr: float = 1e-3  # 2e-3 and up can collapse both towers to constants early on
    weight_decay: float = 0.05
    warmup: int = 50
    train_limit: int | None = None  # first N training images only (tests)
    image_size: int = 28
    patch_size: int = 7  # 16 patches: ~2.5x cheaper per step than patch 4 (49)
    vision_hidden: int = 96
    vision_layers: int = 3
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    version: int = VERSION


def captions() -> list[tuple[str, int]]:
    """Every training caption with its class index: templates x phrases of each class."""
    out: list[tuple[str, int]] = []
    for label, name in enumerate(CLASSES):
        for phrase in PHRASES[name]:
            out.extend((template.format(phrase), label) for template in TEMPLATES)
    return out


def build_model(recipe: Recipe) -> Any:
    """A randomly initialised CLIPModel of the recipe's size (seeded)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(recipe.seed)
    text = {
        "vocab_size": 49408,
        "hidden_size": recipe.text_hidden,
        "intermediate_size": recipe.text_hidden * 4,
        "num_hidden_layers": recipe.text_layers,
        "num_attention_heads": recipe.heads,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {
        "hidden_size": recipe.vision_hidden,
        "intermediate_size": recipe.vision_hidden * 4,
        "num_hidden_layers": recipe.vision_layers,
        "num_attention_heads": recipe.heads,
        "image_size": recipe.image_size,
        "patch_size": recipe.patch_size,
    }
    config = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=recipe.projection_dim
    )
    return CLIPModel(config)


def pixel_values(
    images: np.ndarray, processor: Any, *, chunk: int = 2000, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Pixel tensors for 28x28 images exactly as served: PNG-sized RGB, then the processor."""
    parts = []
    for start in range(0, len(images), chunk):
        batch = [to_image(image, size=size) for image in images[start : start + chunk]]
        parts.append(processor(images=batch, return_tensors="pt")["pixel_values"])
    return torch.cat(parts)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE; pairs of the same class count as positives of each other."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    image_loss = F.cross_entropy(logits, targets)
    text_loss = F.cross_entropy(logits.T, targets)
    return (image_loss + text_loss) / 2


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Half the usable cores, 1 to 4: the matrices are small, so more threads mostly add
    synchronisation, and a busy 2-core machine slows down badly with 2 (measured)."""
    return max(1, min(4, _usable_cpus() // 2))


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projection.
    features: torch.Tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return features


def train(
    out: Path,
    *,
    cache_dir: Path,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    train_limit: int | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> Path:
    """Train the demo CLIP on Fashion-MNIST's train split and save it to `out`; returns `out`."""
    recipe = dataclasses.replace(
        Recipe(), steps=steps, seed=seed, train_limit=train_limit, **overrides
    )
    say = progress or log.info
    started = time.monotonic()
    (out / MARKER).unlink(missing_ok=True)  # a half-written model must not look done
    with _torch_threads(threads or default_threads()):
        model = _fit(recipe, cache_dir=cache_dir, say=say, started=started)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        build_processor(out, image_size=recipe.image_size).save_pretrained(out)
    elapsed = time.monotonic() - started
    marker = {"recipe": dataclasses.asdict(recipe), "train_seconds": round(elapsed, 1)}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    say(f"saved {out} after {elapsed:.1f}s")
    return out


def _fit(recipe: Recipe, *, cache_dir: Path, say: Callable[[str], None], started: float) -> Any:
    images, labels = load_split(cache_dir, "train")
    if recipe.train_limit is not None:
        images, labels = images[: recipe.train_limit], labels[: recipe.train_limit]
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_processor(Path(tmp), image_size=recipe.image_size)
    pixels = pixel_values(images, processor)
    targets = torch.from_numpy(labels)
    say(f"{len(pixels)} training images preprocessed in {time.monotonic() - started:.1f}s")

    pairs = captions()
    caption_labels = torch.tensor([label for _, label in pairs])
    tokens = processor.tokenizer([text for text, _ in pairs], padding=True, return_tensors="pt")
    # captions() lists each class's captions contiguously: its first index and count.
    counts = torch.bincount(caption_labels, minlength=len(CLASSES))
    first = torch.cumsum(counts, 0) - counts

    model = build_model(recipe)
    model.train()
    named: list[tuple[str, torch.nn.Parameter]] = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": rest},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=recipe.lr,
        weight_decay=0.0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    log_every = max(1, min(50, recipe.steps // 10))
    generator = torch.Generator().manual_seed(recipe.seed)
    batch = min(recipe.batch_size, len(pixels))
    order = torch.randperm(len(pixels), generator=generator)
    cursor = 0
    for step in range(recipe.steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(pixels), generator=generator), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        batch_labels = targets[index]
        # One caption per image: a random template/synonym of its class.
        draw = torch.rand(len(index), generator=generator)
        picks = first[batch_labels] + (draw * counts[batch_labels]).long()
        used, inverse = torch.unique(picks, return_inverse=True)
        text = _features(
            model.get_text_features(
                input_ids=tokens["input_ids"][used], attention_mask=tokens["attention_mask"][used]
            )
        )[inverse]
        image = _features(model.get_image_features(pixel_values=pixels[index]))
        loss = clip_loss(image, text, batch_labels, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == recipe.steps - 1:
            say(
                f"step {step + 1}/{recipe.steps} loss {loss.item():.3f} "
                f"scale {model.logit_scale.exp().item():.1f} "
                f"elapsed {time.monotonic() - started:.0f}s"
            )
    model.eval()
    return model


def _marker_matches(out: Path, recipe: Recipe) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    weights = any((out / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    files = all((out / name).is_file() for name in ("config.json", "vocab.json"))
    return bool(marker.get("recipe") == dataclasses.asdict(recipe) and weights and files)


def ensure_demo_model(
    out: Path,
    *,
    cache_dir: Path,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The demo model at `out`, trained once; reused while its marker matches this recipe."""
    recipe = dataclasses.replace(Recipe(), steps=steps, seed=seed)
    if _marker_matches(out, recipe):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{out.name}.lock"):
        if _marker_matches(out, recipe):  # trained by another process meanwhile
            return out
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.training-"))
        try:
            train(
                staging,
                cache_dir=cache_dir,
                steps=steps,
                seed=seed,
                threads=threads,
                progress=progress,
            )
            if out.exists():
                shutil.rmtree(out)
            staging.replace(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock
        yield
        return
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _print(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train (or reuse) the demo model and print progress and the time taken."""
    parser = argparse.ArgumentParser(prog="python -m services.demo.train", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--cache", type=Path, required=True, help="dataset cache directory")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args(argv)
    started = time.monotonic()
    options: dict[str, Any] = {
        "cache_dir": args.cache,
        "steps": args.steps,
        "seed": args.seed,
        "threads": args.threads,
        "progress": _print,
    }
    if args.force:
        train(args.out, **options)
    else:
        ensure_demo_model(args.out, **options)
    print(f"demo model ready at {args.out} in {time.monotonic() - started:.1f}s", flush=True)
    print("prompts: " + ", ".join(CLASS_PROMPTS.values()), flush=True)


if __name__ == "__main__":
    main()
