"""Worker-side decoding: orientation, modes, frames, failures with codes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared.ml.images import DecodeError, decode_image, decode_sized
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


def test_draft_decodes_large_jpegs_smaller_but_reports_the_real_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(make_image(5, size=(2000, 1200)), "JPEG", exif=exif.tobytes())
    full, full_size = decode_sized(data, max_pixels=10**8)
    small, small_size = decode_sized(data, max_pixels=10**8, draft=224)
    assert full_size == small_size == (1200, 2000) == full.size
    assert min(small.size) >= 224 and small.size[0] < full.size[0]
    # Same picture: the reduced decode matches a plain downscale closely.
    ref = np.asarray(full.resize(small.size, Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - ref).mean() < 6


def test_draft_leaves_small_and_non_jpeg_images_alone() -> None:
    png = encode(make_image(6, size=(2000, 1200)), "PNG")
    assert decode_sized(png, max_pixels=10**8, draft=224)[0].size == (2000, 1200)
    jpeg = encode(make_image(7, size=(400, 300)))
    assert decode_sized(jpeg, max_pixels=10**8, draft=224)[0].size == (400, 300)
