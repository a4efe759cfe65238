"""Small JPEG thumbnails, generated once per (image, size) and cached on disk."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from shared.blobs import BlobStore
from shared.errors import InvalidInput


def thumbnail(blobs: BlobStore, image_id: str, *, size: int, cache: Path) -> bytes:
    """The image scaled to fit size x size, as JPEG bytes."""
    cached = cache / str(size) / image_id[:2] / f"{image_id}.jpg"
    if cached.exists():
        return cached.read_bytes()
    data = blobs.get(image_id)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at reduced scale
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot make a thumbnail: {exc}", code="decode_failed") from exc
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=85, optimize=True)
    out = buf.getvalue()
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(out)
    os.replace(tmp, cached)
    return out
