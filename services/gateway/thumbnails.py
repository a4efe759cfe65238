"""Small JPEG thumbnails in a few fixed sizes, decoded at reduced scale, cached on disk.

The cache is bounded in bytes (THUMBNAIL_CACHE_BYTES): past the bound, the least recently
served files go first. A deleted image's thumbnails are purged with it.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from pathlib import Path

from PIL import Image

from shared.blobs import BlobStore, is_valid_id
from shared.errors import InvalidInput, NotFound

log = logging.getLogger(__name__)
# Eviction goes below the bound by this share, so that a full cache does not scan per miss.
EVICT_TO = 0.9
ORIENTATION = 0x0112  # EXIF tag; read before reduce(), which keeps no EXIF
TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def check_size(size: int, allowed: list[int]) -> None:
    """422 `unsupported_thumbnail_size` unless `size` is one of the configured sizes."""
    if size not in allowed:
        raise InvalidInput(
            f"size={size} is not served; use one of {', '.join(map(str, sorted(allowed)))}",
            code="unsupported_thumbnail_size",
        )


def render(data: bytes, *, size: int) -> bytes:
    """`data` scaled to fit size x size (EXIF orientation applied), as JPEG bytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # JPEG: the decoder scales by 1/2, 1/4 or 1/8 in the DCT domain (draft keeps
            # the result at least size x size). Other formats decode whole, then shrink by an
            # integer factor (cheap box averaging) to within 2x of the target before LANCZOS.
            image.draft("RGB", (size, size))
            orientation = image.getexif().get(ORIENTATION, 1)
            rgb = image.convert("RGB")
        factor = max(rgb.width, rgb.height) // (2 * size)
        small = rgb.reduce(factor) if factor >= 2 else rgb
        turn = TURNS.get(orientation)
        if turn is not None:
            small = small.transpose(turn)
        small.thumbnail((size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"cannot make a thumbnail: {exc}", code="decode_failed") from exc
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue()


class ThumbnailCache:
    """Thumbnails on disk under `root/<size>/<id[:2]>/<id>.jpg`, at most `max_bytes` in all."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes on disk, as this process last counted them

    def path(self, image_id: str, size: int) -> Path:
        """Where the thumbnail of `image_id` at `size` is kept."""
        if not is_valid_id(image_id):
            raise NotFound(f"no image {image_id!r}", code="image_not_found")
        return self.root / str(size) / image_id[:2] / f"{image_id}.jpg"

    def get(self, image_id: str, size: int) -> bytes | None:
        """The cached thumbnail, or None; a hit counts as a recent use."""
        path = self.path(image_id, size)
        try:
            data = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:
            return None
        return data

    def put(self, image_id: str, size: int, data: bytes) -> None:
        """Keep `data` (atomically), then evict the least recently used past the bound."""
        if self.max_bytes <= 0 or len(data) > self.max_bytes:
            return
        path = self.path(image_id, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            used = self._count() if self._used is None else self._used
            self._used = used + len(data)
            if self._used > self.max_bytes:
                self._evict()

    def purge(self, image_id: str) -> int:
        """Remove every cached size of `image_id`; how many files went."""
        if not is_valid_id(image_id) or not self.root.is_dir():
            return 0
        removed = 0
        for size_dir in self.root.iterdir():
            path = size_dir / image_id[:2] / f"{image_id}.jpg"
            try:
                freed = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            with self._lock:
                if self._used is not None:
                    self._used = max(0, self._used - freed)
        return removed

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        for path in self.root.glob("*/*/*.jpg"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, path))
        return out

    def _count(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _evict(self) -> None:
        """Delete the least recently used files until the cache is under EVICT_TO of its bound."""
        files = sorted(self._files())
        used = sum(size for _, size, _ in files)
        target = int(self.max_bytes * EVICT_TO)
        for _, size, path in files:
            if used <= target:
                break
            path.unlink(missing_ok=True)
            used -= size
        self._used = used
        log.info("thumbnail cache evicted down to %d bytes", used)


def thumbnail(blobs: BlobStore, image_id: str, *, size: int, cache: ThumbnailCache) -> bytes:
    """The image scaled to fit size x size, as JPEG bytes; NotFound once it is deleted."""
    # Checked on every request, not only on a miss: another gateway may have deleted it.
    if not blobs.exists(image_id):
        raise NotFound(f"no image {image_id}", code="image_not_found")
    cached = cache.get(image_id, size)
    if cached is not None:
        return cached
    out = render(blobs.get(image_id), size=size)
    cache.put(image_id, size, out)
    return out
