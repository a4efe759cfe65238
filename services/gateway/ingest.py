"""Validate uploads before anything is stored: images, archives and their limits."""

from __future__ import annotations

import io
import lzma
import posixpath
import re
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from services.gateway.archives import (
    MAX_LONG_NAME,
    MAX_PAX_HEADER,
    ArchiveError,
    Budget,
    OutOfTime,
    kind_of,
    tar_entries,
    zip_entries,
)
from shared.ml.images import ImageRefused, check_header

# What zipfile and tarfile raise on damaged or crafted archives (found by fuzzing): a bad
# archive is one rejection, never a 500. RuntimeError: an encrypted zip entry.
BAD_ARCHIVE = (
    zipfile.BadZipFile,
    ArchiveError,
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
    max_expand_cpu_s: float = 60.0


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


def is_archive(filename: str, data: bytes | BinaryIO) -> str | None:
    """'zip' or 'tar' when the bytes are such an archive, judged by content not name."""
    return kind_of(io.BytesIO(data) if isinstance(data, bytes) else data)


def inspect_image(filename: str, data: bytes, limits: Limits) -> Candidate | Rejection:
    """Read the header only: a known format, within the pixel limit. Decoding is the worker's."""
    if len(data) > limits.max_file_bytes:
        return Rejection(
            filename,
            "file_too_large",
            f"{len(data)} bytes is over the limit of {limits.max_file_bytes}",
        )
    try:
        width, height = check_header(data, max_pixels=limits.max_image_pixels)
    except ImageRefused as exc:
        return Rejection(filename, exc.code, exc.detail)
    return Candidate(filename, data, width, height)


def _safe_member(name: str) -> str | None:
    """The member's normalised relative path, or None if it escapes the archive."""
    name = name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    norm = posixpath.normpath(name)
    if norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/":
        return None
    return norm


_WHY = {
    "archive_link": "links inside archives are not followed",
    "archive_special_file": "only regular files are read from archives",
    "archive_too_large": "the archive expands beyond the configured size limit",
    "archive_too_many_entries": "the archive has more entries than allowed",
    "archive_header_too_large": (
        f"a tar long-name header over {MAX_LONG_NAME} bytes or a pax header over "
        f"{MAX_PAX_HEADER} bytes; the archive is not read further"
    ),
    "unsafe_path": "the entry's path leaves the archive (absolute or '..')",
    "nested_archive": "archives inside archives are not expanded",
    "empty_archive": "the archive holds no files",
    "request_too_large": "the request's files expand beyond the configured size limit",
}


def expand(
    filename: str, data: bytes | BinaryIO, limits: Limits, budget: Budget | None = None
) -> Iterator[Candidate | Rejection]:
    """Every image the upload holds: itself, or each entry of a zip/tar, validated.

    `budget` is the request's: every file and archive entry it expands to is charged to it.
    """
    fileobj = io.BytesIO(data) if isinstance(data, bytes) else data
    if budget is None:
        budget = Budget(
            max_entries=limits.max_archive_entries,
            max_bytes=limits.max_archive_bytes,
            max_cpu_s=limits.max_expand_cpu_s,
        )
    kind = kind_of(fileobj)
    if kind is None:
        fileobj.seek(0)
        whole = fileobj.read(limits.max_file_bytes + 1)
        if not budget.charge(min(len(whole), limits.max_file_bytes)):
            yield Rejection(filename, "archive_too_large", _WHY["request_too_large"])
            return
        yield inspect_image(filename, whole, limits)
        return
    entries = zip_entries if kind == "zip" else tar_entries
    found = 0
    try:
        budget.check_time()
        for name, body, why in entries(
            fileobj, budget=budget, max_file_bytes=limits.max_file_bytes
        ):
            found += 1
            shown = f"{filename}/{clean_filename(name)}" if name else filename
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
    except OutOfTime as exc:
        yield Rejection(filename, "archive_too_slow", f"{exc}; the rest is not read")
        return
    except BAD_ARCHIVE as exc:
        yield Rejection(filename, "bad_archive", f"cannot read the archive: {exc}")
        return
    if not found:  # said so, rather than a job of nothing
        yield Rejection(filename, "empty_archive", _WHY["empty_archive"])
