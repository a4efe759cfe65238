"""Turn stored bytes into RGB images the way the model expects, one failure per item."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(Exception):
    """An image that cannot be used, with a stable code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode fully, apply EXIF orientation, take the first frame, convert to RGB."""
    return decode_sized(data, max_pixels=max_pixels)[0]


def decode_sized(
    data: bytes, *, max_pixels: int, draft: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """As decode_image, plus the image's displayed size; with `draft`, a large JPEG is decoded
    at a reduced scale (DCT scaling, 2-8x faster) that still leaves its short side at least
    `draft` pixels, so the model's own resize does the last step."""
    if not data:
        raise DecodeError("empty_file", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(
                    "image_too_large", f"{width}x{height} pixels is over the limit of {max_pixels}"
                )
            if draft and image.format == "JPEG" and min(width, height) >= 2 * draft:
                image.draft("RGB", (draft, draft))
            image.load()
            decoded = image.size
            image = ImageOps.exif_transpose(image)
            shown = (height, width) if image.size != decoded else (width, height)
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16-bit and float greyscale: scale to 8 bits before going to RGB.
                image = image.convert("I").point(lambda v: v / 256).convert("L")
            return image.convert("RGB"), shown
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("not_an_image", "not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DecodeError("decode_failed", f"cannot decode image: {exc}") from exc
