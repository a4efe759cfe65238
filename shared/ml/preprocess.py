"""CLIP image preprocessing, step for step as the model's own processor, without its overhead.

transformers' PIL backend converts every image PIL → numpy → PIL → numpy and normalises one
image at a time (about 4 ms an image here). This does the same resize (PIL, same filter and
output size), the same centre crop, then rescales and normalises each image in numpy, in
place. The result equals the processor's within float rounding (a test holds it to that);
any processor setting this does not reproduce exactly falls back to the processor itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


class ClipPreprocess:
    """Resize shortest edge → centre crop → rescale → normalise, as CLIPImageProcessor does."""

    def __init__(
        self,
        *,
        shortest_edge: int,
        crop: tuple[int, int],
        resample: int,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.shortest_edge, self.crop, self.resample = shortest_edge, crop, resample
        self.scale = np.float32(scale)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def from_processor(cls, image_processor: Any) -> ClipPreprocess | None:
        """The fast path for this processor, or None where it would not be exact."""
        ip = image_processor
        size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
        edge = _get(size, "shortest_edge")
        crop_hw = (_get(crop, "height"), _get(crop, "width"))
        plain = (
            getattr(ip, "do_resize", False)
            and getattr(ip, "do_center_crop", False)
            and getattr(ip, "do_rescale", False)
            and getattr(ip, "do_normalize", False)
            and not getattr(ip, "do_pad", False)
            and edge
            and None not in crop_hw
            and not _get(size, "longest_edge")
            and len(ip.image_mean) == 3
        )
        if not plain or crop_hw[0] > edge or crop_hw[1] > edge:
            return None
        return cls(
            shortest_edge=int(edge),
            crop=(int(crop_hw[0]), int(crop_hw[1])),
            resample=int(ip.resample),
            scale=float(ip.rescale_factor),
            mean=ip.image_mean,
            std=ip.image_std,
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One RGB image → its pixel values, channels first (numpy and PIL release the GIL,
        so callers run this in a thread pool while the model works)."""
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        ch, cw = self.crop
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        image = image.crop((left, top, left + cw, top + ch))
        pixels = np.asarray(image, dtype=np.float32)
        pixels *= self.scale
        pixels -= self.mean
        pixels /= self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)
