"""Images in: the header checks every service runs before decoding (format allow-list, pixels,
aspect), and decoding to RGB the way the model expects, one failure per item with a stable
code. Pillow only: the gateway uses the checks without loading torch."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError


class ImageRefused(ValueError):
    """An image that cannot be used, with a stable code and a readable detail."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


DecodeError = ImageRefused  # what the decoder raises: the same codes and details

FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"})
# CLIP scales the shorter side to 224 px: a 60000x1 strip would become 3 billion pixels in the
# worker. Longer than this many times the short side is refused with the oversized images.
MAX_ASPECT_RATIO = 100


def check_header(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image in an allowed format within the limits; reads the header
    only (Pillow decodes nothing before load()). ImageRefused otherwise."""
    if not data:
        raise ImageRefused("empty_file", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRefused("image_too_large", "image dimensions are over the pixel limit") from None
    except UnidentifiedImageError:
        raise ImageRefused("not_an_image", "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRefused("not_an_image", f"unreadable image header: {exc}") from None
    if fmt not in FORMATS:
        raise ImageRefused(
            "unsupported_format",
            f"{fmt} is not supported; use one of {', '.join(sorted(FORMATS))}",
        )
    problem = dimension_problem(width, height, max_pixels=max_pixels)
    if problem:
        raise ImageRefused("image_too_large", problem)
    return width, height


def dimension_problem(width: int, height: int, *, max_pixels: int) -> str | None:
    """Why an image of this size must not be decoded (too many pixels, too long a strip)."""
    if width * height > max_pixels:
        return f"{width}x{height} pixels is over the limit of {max_pixels}"
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        return f"{width}x{height} is longer than {MAX_ASPECT_RATIO} times its short side"
    return None


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
