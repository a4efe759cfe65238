"""Worker-side decoding: orientation, modes, frames, failures with codes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.worker.decode import DecodeError, decode_image
from tests.images import encode, make_image


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = encode(make_image(1, size=(40, 20)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, max_pixels=10**6).size == (20, 40)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "I;16"])
def test_modes_become_rgb(mode: str) -> None:
    if mode == "I;16":
        image = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
        fmt = "PNG"
    else:
        image = make_image(2, size=(32, 32)).convert(mode)
        fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    decoded = decode_image(encode(image, fmt), max_pixels=10**6)
    assert decoded.mode == "RGB" and decoded.size == image.size


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = decode_image(buf.getvalue(), max_pixels=10**6)
    assert first.getpixel((0, 0))[0] > 200


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"plain text", "not_an_image"),
        (encode(make_image(3, size=(300, 300)))[:600], "decode_failed"),
    ],
)
def test_failures_have_codes(data: bytes, code: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_image(data, max_pixels=10**6)
    assert err.value.code == code


def test_pixel_limit() -> None:
    with pytest.raises(DecodeError) as err:
        decode_image(encode(make_image(4, size=(200, 200))), max_pixels=100 * 100)
    assert err.value.code == "image_too_large"
