"""The fast preprocessing path equals the model's own image processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.demo.tokenizer import build_processor
from shared.ml.preprocess import ClipPreprocess


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    return build_processor(tmp_path_factory.mktemp("proc"), image_size=224).image_processor


SIZES = [
    (500, 375),
    (375, 500),
    (224, 224),
    (225, 1000),
    (1000, 225),
    (1, 1),
    (2, 500),
    (1023, 767),
    (224, 300),
    (4000, 3000),
]


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_same_pixels_as_the_processor(processor, w: int, h: int) -> None:
    fast = ClipPreprocess.from_processor(processor)
    assert fast is not None
    rng = np.random.default_rng(w * 7919 + h)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    got = fast(image)
    assert got.shape == expected.shape == (3, 224, 224)
    assert torch.allclose(got, expected, atol=1e-5)


def test_settings_it_cannot_reproduce_fall_back(processor, tmp_path: Path) -> None:
    other = build_processor(tmp_path, image_size=224).image_processor
    other.do_center_crop = False
    assert ClipPreprocess.from_processor(other) is None
    other = build_processor(tmp_path, image_size=224).image_processor
    other.crop_size = {"height": 256, "width": 256}
    assert ClipPreprocess.from_processor(other) is None
