"""Validate uploads before anything is stored: images, archives and their limits."""

from __future__ import annotations

import io
import lzma
import posixpath
import re
import tarfile
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"})
# CLIP scales the shorter side to 224 px: a 60000x1 strip would become 3 billion pixels in the
# worker. Longer than this many times the short side is refused with the oversized images.
MAX_ASPECT_RATIO = 100
# What zipfile and tarfile raise on damaged or crafted archives (found by fuzzing): a bad
# archive is one rejection, never a 500. RuntimeError: an encrypted zip entry.
BAD_ARCHIVE = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
)
# C0 and C1 controls, and the bidi marks that can make "gpj.exe" display as "exe.jpg".
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True, slots=True)
class Limits:
    """How much one file, one archive and one image may hold."""

    max_file_bytes: int
    max_image_pixels: int
    max_archive_entries: int
    max_archive_bytes: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file that passed validation: its name, bytes and size."""

    filename: str
    data: bytes
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """A file refused at the door, with a stable code."""

    filename: str
    code: str
    detail: str


def clean_filename(name: str | bytes | None) -> str:
    """A printable relative name: no control characters, no empty, '.' or '..' parts, <= 255."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", errors="replace")
    name = unicodedata.normalize("NFC", name or "")
    name = _CONTROL.sub("", name).replace("\\", "/")
    name = "/".join(part for part in name.split("/") if part not in ("", ".", ".."))
    return name[-255:] or "unnamed"


def is_archive(filename: str, data: bytes) -> str | None:
    """'zip' or 'tar' when the bytes are such an archive, judged by content not name."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(data) > 262 and data[257:262] == b"ustar":
        return "tar"
    if filename.lower().endswith((".tar", ".tar.gz", ".tgz")):
        try:
            with tarfile.open(fileobj=io.BytesIO(data)):
                return "tar"
        except BAD_ARCHIVE:
            return None
    return None


def inspect_image(filename: str, data: bytes, limits: Limits) -> Candidate | Rejection:
    """Read the header only: a known format, within the pixel limit. Decoding is the worker's."""
    if not data:
        return Rejection(filename, "empty_file", "the file is empty")
    if len(data) > limits.max_file_bytes:
        return Rejection(
            filename,
            "file_too_large",
            f"{len(data)} bytes is over the limit of {limits.max_file_bytes}",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Rejection(filename, "image_too_large", "image dimensions are over the pixel limit")
    except UnidentifiedImageError:
        return Rejection(filename, "not_an_image", "not a recognised image format")
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return Rejection(filename, "not_an_image", f"unreadable image header: {exc}")
    if fmt not in FORMATS:
        return Rejection(
            filename,
            "unsupported_format",
            f"{fmt} is not supported; use one of {', '.join(sorted(FORMATS))}",
        )
    problem = dimension_problem(width, height, max_pixels=limits.max_image_pixels)
    if problem:
        return Rejection(filename, "image_too_large", problem)
    return Candidate(filename, data, width, height)


def dimension_problem(width: int, height: int, *, max_pixels: int) -> str | None:
    """Why an image of this size must not be decoded (too many pixels, too long a strip)."""
    if width * height > max_pixels:
        return f"{width}x{height} pixels is over the limit of {max_pixels}"
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        return f"{width}x{height} is longer than {MAX_ASPECT_RATIO} times its short side"
    return None


def _safe_member(name: str) -> str | None:
    """The member's normalised relative path, or None if it escapes the archive."""
    name = name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    norm = posixpath.normpath(name)
    if norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/":
        return None
    return norm


def _archive_entries(
    kind: str, data: bytes, limits: Limits
) -> Iterator[tuple[str, bytes | None, str]]:
    """(name, bytes or None, why-not) for each regular entry, enforcing the archive limits."""
    count, expanded = 0, 0

    def budget(name: str, size: int) -> str:
        nonlocal count, expanded
        count += 1
        expanded += size
        if count > limits.max_archive_entries:
            return "archive_too_many_entries"
        if size > limits.max_file_bytes or expanded > limits.max_archive_bytes:
            return "archive_too_large"
        return ""

    if kind == "zip":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if not info.filename:  # no name at all: nothing safe to call it
                    yield "", None, "unsafe_path"
                    continue
                if info.is_dir():
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    yield info.filename, None, "archive_link"
                    continue
                why = budget(info.filename, info.file_size)
                if why:
                    yield info.filename, None, why
                    if why == "archive_too_many_entries":
                        return
                    continue
                with zf.open(info) as fh:  # read at most the declared size plus one byte
                    body = fh.read(info.file_size + 1)
                yield info.filename, body[: info.file_size], ""
    else:
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for member in tf:
                if member.isdir():
                    continue
                if member.issym() or member.islnk():
                    yield member.name, None, "archive_link"
                    continue
                if not member.isfile():
                    yield member.name, None, "archive_special_file"
                    continue
                why = budget(member.name, member.size)
                if why:
                    yield member.name, None, why
                    if why == "archive_too_many_entries":
                        return
                    continue
                extracted = tf.extractfile(member)
                yield member.name, extracted.read() if extracted else b"", ""


_WHY = {
    "archive_link": "links inside archives are not followed",
    "archive_special_file": "only regular files are read from archives",
    "archive_too_large": "the archive expands beyond the configured size limit",
    "archive_too_many_entries": "the archive has more entries than allowed",
    "unsafe_path": "the entry's path leaves the archive (absolute or '..')",
    "nested_archive": "archives inside archives are not expanded",
    "empty_archive": "the archive holds no files",
}


def expand(filename: str, data: bytes, limits: Limits) -> Iterator[Candidate | Rejection]:
    """Every image the upload holds: itself, or each entry of a zip/tar, validated."""
    kind = is_archive(filename, data)
    if kind is None:
        yield inspect_image(filename, data, limits)
        return
    found = 0
    try:
        for name, body, why in _archive_entries(kind, data, limits):
            found += 1
            shown = f"{filename}/{clean_filename(name)}"
            safe = _safe_member(name)
            if not why and safe is None:
                why = "unsafe_path"
            if why or body is None:
                yield Rejection(shown, why, _WHY.get(why, why))
            elif is_archive(name, body):
                yield Rejection(shown, "nested_archive", _WHY["nested_archive"])
            elif posixpath.basename(name).startswith("._") or name.startswith("__MACOSX/"):
                found -= 1  # macOS resource forks, not images
            else:
                yield inspect_image(f"{filename}/{clean_filename(safe)}", body, limits)
    except BAD_ARCHIVE as exc:
        yield Rejection(filename, "bad_archive", f"cannot read the archive: {exc}")
        return
    if not found:  # said so, rather than a job of nothing
        yield Rejection(filename, "empty_archive", _WHY["empty_archive"])
