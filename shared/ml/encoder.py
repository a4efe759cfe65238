"""The encoder a service holds: the checkpoint loaded once, with the towers it runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from shared.errors import ModelLoadError
from shared.ml import policy
from shared.ml.loader import BOTH, IMAGE_ONLY, Tower, load
from shared.ml.towers import ImageTower, Int8TextTower, TextTower
from shared.settings import Settings

__all__ = ["BOTH", "IMAGE_ONLY", "ClipEncoder", "Tower"]
log = logging.getLogger(__name__)


class ClipEncoder:
    """Loads CLIP_MODEL once and encodes images and texts into unit-length vectors.

    A process keeps only the towers it runs (`towers`): a worker the image tower, the query
    service the text tower (and the image tower where image search is on).
    """

    def __init__(
        self,
        *,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        text_quant: str = "none",
        towers: frozenset[Tower] = BOTH,
    ) -> None:
        self.name = model
        self.towers = towers
        self.device = policy.pick_device(device)
        self.dtype = policy.pick_dtype(dtype, self.device)
        self.processor, self.model = load(
            model, dtype=self.dtype, device=self.device, towers=towers
        )
        config = self.model.config
        self.dim = int(config.projection_dim)
        # One forward pass at a time per process; torch already uses every core.
        lock = threading.Lock()
        self.image: ImageTower | None = None
        self.text: TextTower | None = None
        self.text_int8 = False
        if "image" in towers:
            self.image = ImageTower(
                model=self.model,
                processor=self.processor,
                device=self.device,
                dtype=self.dtype,
                lock=lock,
            )
        if "text" in towers:
            solo = self._int8_copy(text_quant, dtype)
            self.text_int8 = solo is not None
            self.text = TextTower(
                model=self.model,
                tokenizer=self.processor.tokenizer,
                device=self.device,
                lock=lock,
                solo=solo,
            )
        self.input_size = int(config.vision_config.image_size)
        log.info(
            "loaded %s (%s) on %s as %s%s (dim %d)",
            model,
            " and ".join(f"{t} tower" for t in sorted(towers)),
            self.device,
            self.dtype,
            ", int8 text tower for single texts" if self.text_int8 else "",
            self.dim,
        )

    def _int8_copy(self, text_quant: str, dtype: str) -> Int8TextTower | None:
        if not policy.int8_text(text_quant, dtype=dtype, device=self.device):
            return None
        try:
            return Int8TextTower(self.model)
        except Exception as exc:  # auto falls back; an explicit int8 says why it cannot
            if text_quant == "int8":
                raise ModelLoadError(
                    f"CLIP_TEXT_QUANT=int8 failed: {exc}", code="no_int8_engine"
                ) from exc
            log.warning("int8 text tower unavailable, texts stay in %s: %s", self.dtype, exc)
            return None

    @classmethod
    def from_settings(cls, settings: Settings, *, towers: frozenset[Tower]) -> ClipEncoder:
        """The encoder that CLIP_MODEL, CLIP_DEVICE and CLIP_DTYPE describe, with `towers`
        only; CLIP_TEXT_QUANT applies to the text tower."""
        return cls(
            model=settings.clip_model,
            device=settings.clip_device,
            dtype=settings.clip_dtype,
            text_quant=settings.clip_text_quant if "text" in towers else "none",
            towers=towers,
        )

    def _image(self) -> ImageTower:
        if self.image is None:
            raise RuntimeError(f"this process loaded {self.name!r} without its image tower")
        return self.image

    def _text(self) -> TextTower:
        if self.text is None:
            raise RuntimeError(f"this process loaded {self.name!r} without its text tower")
        return self.text

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One RGB image's pixel values (see ImageTower.prepare)."""
        return self._image().prepare(image)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pixel values for a batch of RGB images."""
        return torch.stack([self.prepare(image) for image in images])

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Unit vectors for preprocessed pixel values, in one forward pass."""
        return self._image().encode_pixels(pixels)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit vectors for a batch of RGB images."""
        return self._image().encode(images)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for texts (see TextTower.encode)."""
        return self._text().encode(texts)

    def warmup(self) -> None:
        """Run every tower loaded once so the first real request is not the slow one."""
        if self.text is not None:
            self.encode_texts(["warm up"])
            self.encode_texts(["warm up", "a batch"])
        if self.image is not None:
            self.encode_images([Image.new("RGB", (64, 64))])
