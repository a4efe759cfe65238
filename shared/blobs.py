"""Content-addressed blob store: key = SHA-256 hex of the bytes.

`BlobStore` keeps the bytes in a local directory (one machine, or a shared volume);
`shared.s3.S3BlobStore` keeps them in an S3-compatible bucket (many machines) with the same
methods. `make_blob_store` picks one from the settings (`BLOB_BACKEND=local|s3`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import NotFound

if TYPE_CHECKING:
    from shared.settings import Settings

_KEY = re.compile(r"^[0-9a-f]{64}$")


def content_id(data: bytes) -> str:
    """The image id of some bytes: their SHA-256, hex."""
    return hashlib.sha256(data).hexdigest()


def is_valid_id(key: str) -> bool:
    """Whether `key` has the shape of an image id (guards every path built from it)."""
    return bool(_KEY.match(key))


class BlobStore:
    """Stores bytes under their SHA-256 in a two-level fan-out directory tree.

    Every backend has put/get/exists/delete and `local_path`; only this one has `path`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """Where the blob for `key` lives."""
        if not is_valid_id(key):
            raise NotFound(f"no image {key!r}", code="image_not_found")
        return self.root / key[:2] / key[2:4] / key

    def local_path(self, key: str) -> Path | None:
        """A local file holding the blob (to serve it without reading it into memory).

        None when there is none here: the blob is missing, or the backend keeps no local
        files (S3); read the bytes with get() then.
        """
        if not is_valid_id(key):
            return None
        path = self.path(key)
        return path if path.is_file() else None

    def put(self, data: bytes) -> str:
        """Store `data` (atomically, idempotently) and return its key."""
        key = content_id(data)
        target = self.path(key)
        if target.exists():
            return key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes:
        """The bytes stored under `key`; NotFound if there are none."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no image {key!r}", code="image_not_found") from None

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key`."""
        return is_valid_id(key) and self.path(key).exists()

    def delete(self, key: str) -> bool:
        """Remove the blob; True if it existed."""
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def ping(self) -> bool:
        """Whether the store can be written (its root is a writable directory)."""
        if not (self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)):
            raise OSError(f"BLOB_DIR {self.root} is not a writable directory")
        return True

    def listing(self) -> Iterator[tuple[str, float]]:
        """Every key stored, with when it was written (Unix time)."""
        for first in sorted(self.root.iterdir()):
            if not first.is_dir() or len(first.name) != 2:
                continue
            for second in sorted(first.iterdir()):
                for entry in os.scandir(second):
                    if is_valid_id(entry.name):
                        yield entry.name, entry.stat().st_mtime


def make_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings name: BLOB_DIR on local disk, or an S3 bucket."""
    if settings.blob_backend == "s3":
        from shared.s3 import S3BlobStore  # boto3 is imported only when S3 is used

        return S3BlobStore.from_settings(settings)
    return BlobStore(settings.blob_dir)
