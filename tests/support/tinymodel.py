"""A small CLIP checkpoint built locally (no hub): real CLIP tokenizer, configurable towers."""

from __future__ import annotations

from pathlib import Path

from services.demo.tokenizer import build_processor


def build_tiny_clip(
    out: Path,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    hidden: int = 32,
    layers: int = 2,
    projection_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised small CLIPModel plus processor to `out` (save_pretrained)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    model = CLIPModel(config)
    model.save_pretrained(out)
    build_processor(out, image_size=image_size).save_pretrained(out)
    return out
