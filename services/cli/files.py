"""Find the files an ingest sends: folders walked, globs expanded, archives recognised, hashed."""

from __future__ import annotations

import glob
import hashlib
import os
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.cli.client import CliError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Source:
    """One local file to send: where it is, the name the gateway sees, its size."""

    path: Path
    name: str
    size: int
    archive: bool


@dataclass(frozen=True, slots=True)
class Scanned:
    """A source with its SHA-256 and the image ids it holds (None: cannot tell beforehand)."""

    source: Source
    digest: str
    image_ids: tuple[str, ...] | None


def is_archive_name(name: str) -> bool:
    """Whether the name looks like a zip or tar archive."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def is_wanted(name: str) -> bool:
    """Whether a file met while walking a folder or a glob is an image or an archive."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES or is_archive_name(name)


def collect(paths: Iterable[str]) -> list[Source]:
    """Every file to send, in a stable order, each once; CliError for a path that names nothing."""
    seen: set[Path] = set()
    out: list[Source] = []
    for raw in paths:
        for path, name in _expand(raw):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(_source(path=path, name=name))
    return out


def _expand(raw: str) -> Iterator[tuple[Path, str]]:
    """(path, upload name) for one command-line argument."""
    path = Path(raw).expanduser()
    if path.is_dir():
        yield from _walk(path)
    elif path.is_file():
        yield path, path.name  # named explicitly: sent whatever its extension
    elif any(ch in raw for ch in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(raw), recursive=True))
        if not matches:
            raise CliError(f"no files match {raw!r}")
        for match in map(Path, matches):
            if match.is_dir():
                yield from _walk(match)
            elif match.is_file() and is_wanted(match.name):
                yield match, match.name
    else:
        raise CliError(f"no such file or folder: {raw}")


def _walk(folder: Path) -> Iterator[tuple[Path, str]]:
    """Images and archives under `folder`, named 'folder/sub/file'; hidden entries skipped."""
    root = folder.resolve().name or "root"
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(here).relative_to(folder)
        for name in sorted(names):
            if not name.startswith(".") and is_wanted(name):
                yield Path(here) / name, (Path(root) / rel / name).as_posix()


def _source(*, path: Path, name: str) -> Source:
    """A Source for a file, with its size."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return Source(path=path, name=name, size=size, archive=is_archive_name(name))


def scan(source: Source) -> Scanned:
    """Hash a source and, for an archive, each image entry inside it (OSError if unreadable)."""
    with source.path.open("rb") as fh:
        digest = _sha256(fh)
    if not source.archive:
        return Scanned(source, digest, (digest,))
    return Scanned(source, digest, archive_image_ids(source.path))


def _sha256(fh: IO[bytes]) -> str:
    """The SHA-256 hex of a stream's remaining bytes."""
    h = hashlib.sha256()
    while chunk := fh.read(READ_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def archive_image_ids(path: Path) -> tuple[str, ...] | None:
    """The ids of an archive's entries, or None when some entry could never be indexed."""
    try:
        ids = _zip_ids(path) if zipfile.is_zipfile(path) else _tar_ids(path)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, NotImplementedError):
        return None
    return tuple(ids) if ids else None


def _skipped_by_gateway(name: str) -> bool:
    """Entries the gateway ignores inside archives (macOS resource forks)."""
    return Path(name).name.startswith("._") or name.startswith("__MACOSX/")


def _zip_ids(path: Path) -> list[str] | None:
    """Entry ids of a zip; None if it holds a link (which the gateway refuses)."""
    ids = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir() or _skipped_by_gateway(info.filename):
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                return None
            with zf.open(info) as fh:
                ids.append(_sha256(fh))
    return ids


def _tar_ids(path: Path) -> list[str] | None:
    """Entry ids of a tar (any compression); None if it holds anything but regular files."""
    ids = []
    with tarfile.open(path) as tf:
        for member in tf:
            if member.isdir() or _skipped_by_gateway(member.name):
                continue
            extracted = tf.extractfile(member) if member.isfile() else None
            if extracted is None:
                return None
            ids.append(_sha256(extracted))
    return ids
