"""What every service checks in an image's header before decoding it (no web or torch imports)."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"})
# CLIP scales the shorter side to 224 px: a 60000x1 strip would become 3 billion pixels in the
# worker. Longer than this many times the short side is refused with the oversized images.
MAX_ASPECT_RATIO = 100


class ImageRefused(ValueError):
    """An image refused from its header, with a stable code and a readable detail."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


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
