"""A result grid like the Milvus tutorial's: thumbnails in rows, a caption under each, a title."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
PLACEHOLDER = (225, 225, 225)
PAD = 4
LINE = 14
TITLE_HEIGHT = 30
CAPTION_LINES = 2


def make_grid(
    title: str, cells: list[tuple[bytes, str]], *, columns: int = 5, cell: int = 150
) -> Image.Image:
    """A `columns`-wide grid of (image bytes, caption) cells, `cell` px each, under a title."""
    columns = max(1, columns)
    rows = max(1, math.ceil(len(cells) / columns))
    caption_h = CAPTION_LINES * LINE + 2 * PAD
    canvas = Image.new(
        "RGB", (columns * cell, TITLE_HEIGHT + rows * (cell + caption_h)), BACKGROUND
    )
    draw = ImageDraw.Draw(canvas)
    _draw_title(draw, title=title, width=canvas.width)
    font = _font(12)
    for index, (data, caption) in enumerate(cells):
        row, col = divmod(index, columns)
        x, y = col * cell, TITLE_HEIGHT + row * (cell + caption_h)
        _paste_thumbnail(canvas, data=data, box=(x, y, cell))
        for n, line in enumerate(caption.splitlines()[:CAPTION_LINES]):
            text = _fit(draw, text=line, font=font, width=cell - 2 * PAD)
            draw.text((x + PAD, y + cell + PAD + n * LINE), text, fill=INK, font=font)
    return canvas


def _font(size: int) -> Font:
    """Pillow's built-in font at `size` (the bitmap one where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):
        return ImageFont.load_default()


def _draw_title(draw: ImageDraw.ImageDraw, *, title: str, width: int) -> None:
    """The title, centred in the band at the top."""
    font = _font(16)
    text = _fit(draw, text=title, font=font, width=width - 2 * PAD, keep_end=False)
    left = max(PAD, (width - draw.textlength(text, font=font)) / 2)
    draw.text((left, (TITLE_HEIGHT - 16) / 2), text, fill=INK, font=font)


def _paste_thumbnail(canvas: Image.Image, *, data: bytes, box: tuple[int, int, int]) -> None:
    """The image scaled into a square cell and centred there; a grey square if unreadable."""
    x, y, size = box
    inner = size - 2 * PAD
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        image = Image.new("RGB", (inner, inner), PLACEHOLDER)
    image.thumbnail((inner, inner))
    canvas.paste(image, (x + (size - image.width) // 2, y + (size - image.height) // 2))


def _fit(
    draw: ImageDraw.ImageDraw, *, text: str, font: Font, width: int, keep_end: bool = True
) -> str:
    """`text` shortened with '...' until it fits `width` px (keeping its end for file paths)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(f"...{text}" if keep_end else f"{text}...", font=font) > width:
        text = text[1:] if keep_end else text[:-1]
    return f"...{text}" if keep_end else f"{text}..."
