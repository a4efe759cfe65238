"""The two towers of a dual encoder: images and texts to unit vectors, one pass at a time."""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.ml.loader import give_back_freed_memory
from shared.ml.preprocess import ClipPreprocess

log = logging.getLogger(__name__)


class Int8TextTower(torch.nn.Module):
    """A float32 copy of CLIP's text tower with int8 Linear weights, for texts encoded alone.

    A lone query's pass reads every weight once for a handful of tokens, so it is bound by
    memory bandwidth: int8 weights are half of bfloat16's bytes (3.9 ms a text against 6.4
    here, ViT-B/32, two threads). Activations are quantized per call with one scale for the
    whole input, so in a padded batch a text's vector would depend on its neighbours
    (cosine down to 0.998 against its own pass, measured): batches use the model's own
    tower. Weights get one scale per output channel; norms and embeddings are float32
    copies of the loaded model's values (so already rounded to CLIP_DTYPE; the precision
    bench measures the whole path). torch's eager int8 path (torch.ao) is the one with fast
    CPU kernels without torch.compile; it warns that it will move to torchao.
    """

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.text_model = copy.deepcopy(clip.text_model).float().eval()
        self.text_projection = copy.deepcopy(clip.text_projection).float().eval()
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        # torch.ao warns on every call that it moves to torchao: said once here instead.
        log.info("int8 text tower via torch.ao dynamic quantization (deprecated upstream)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                self,
                {"text_model": qconfig, "text_projection": qconfig},
                dtype=torch.qint8,
                mapping={torch.nn.Linear: torch.ao.nn.quantized.dynamic.Linear},
                inplace=True,
            )
        give_back_freed_memory()  # the float32 copies just dropped: ~150 MB kept otherwise

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The projected text features, as CLIPModel.get_text_features computes them."""
        pooled = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).pooler_output
        features: torch.Tensor = self.text_projection(pooled)
        return features


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projection;
    # older releases return the tensor itself.
    features: torch.Tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return features


def _normalise(features: torch.Tensor) -> np.ndarray:
    vectors = features.float()
    vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    array: np.ndarray = vectors.cpu().numpy()
    return array


class ImageTower:
    """Preprocesses and encodes images with the model's image tower."""

    def __init__(
        self,
        *,
        model: Any,
        processor: Any,
        device: torch.device,
        dtype: torch.dtype,
        lock: threading.Lock,
    ) -> None:
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self._lock = lock
        self._fast = ClipPreprocess.from_processor(processor.image_processor)
        self.input_size = int(model.config.vision_config.image_size)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One RGB image's pixel values, as the model's own image processor makes them.

        Thread-safe and mostly GIL-free: the worker runs it in a pool beside the model.
        """
        if self._fast is not None:
            return self._fast(image)
        pixels: torch.Tensor = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        return pixels[0]

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Unit vectors for preprocessed pixel values, in one forward pass."""
        with self._lock:
            out = self.model.get_image_features(
                pixel_values=pixels.to(self.device, self.dtype, non_blocking=True)
            )
        return _normalise(_features(out))

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit vectors for a batch of RGB images."""
        return self.encode_pixels(torch.stack([self.prepare(image) for image in images]))


class TextTower:
    """Tokenizes and encodes texts with the model's text tower (and its int8 copy, if any)."""

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        lock: threading.Lock,
        solo: Int8TextTower | None,
    ) -> None:
        self.model, self.tokenizer, self.device, self.solo = model, tokenizer, device, solo
        self._lock = lock
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for texts, each truncated to the model's context length.

        With an int8 copy, a single text goes through it and a batch through the model's own
        tower (see Int8TextTower).
        """
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        with self._lock:
            if self.solo is not None and len(texts) == 1:
                return _normalise(self.solo(ids, mask))
            out = self.model.get_text_features(input_ids=ids, attention_mask=mask)
        return _normalise(_features(out))
