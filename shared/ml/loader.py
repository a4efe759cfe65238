"""Load a checkpoint and its own processor once, keeping only the towers a process runs."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoProcessor, CLIPModel

from shared.errors import ModelLoadError

Tower = Literal["image", "text"]
BOTH: frozenset[Tower] = frozenset({"image", "text"})
IMAGE_ONLY: frozenset[Tower] = frozenset({"image"})  # what a worker loads


def load(
    model: str, *, dtype: torch.dtype, device: torch.device, towers: frozenset[Tower]
) -> tuple[Any, Any]:
    """The processor and the model (on `device`, in eval mode) with only `towers` kept."""
    try:
        processor: Any = AutoProcessor.from_pretrained(model)  # type: ignore[no-untyped-call]
        clip: Any = CLIPModel.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        where = "directory" if Path(model).exists() else "hub id"
        raise ModelLoadError(
            f"cannot load CLIP model {model!r} ({where}): {exc}. Set CLIP_MODEL to a local "
            "directory with a CLIP checkpoint saved by save_pretrained (config, weights, "
            "tokenizer and preprocessor files), or make the Hugging Face hub reachable.",
            code="model_unavailable",
        ) from exc
    drop_towers(clip, towers)
    return processor, clip.to(device).eval()


def drop_towers(model: torch.nn.Module, keep: frozenset[Tower]) -> list[str]:
    """Remove the submodules of the towers not in `keep`; the names removed.

    Dual encoders name their parts after the tower (`text_model`, `text_projection`,
    `vision_model`, `visual_projection`), so a part is the text tower's when its name says
    "text", the image tower's when it says "vision" or "visual".
    """
    dropped = []
    for name, _ in list(model.named_children()):
        tower: Tower | None = (
            "text" if "text" in name else "image" if "vision" in name or "visual" in name else None
        )
        if tower is not None and tower not in keep:
            setattr(model, name, None)
            dropped.append(name)
    if dropped:
        give_back_freed_memory()
    return dropped


def give_back_freed_memory() -> None:
    """Return freed heap pages to the OS where the C library can (glibc's malloc_trim)."""
    gc.collect()  # the swapped-out modules sit in reference cycles
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
