"""Read zip and tar archives as streams, charging every declared size to one request budget.

Python's `tarfile` reads a GNU long-name or pax header's whole declared size into memory
before it yields a member: a 1 KB bz2 tar declaring a 1.5 GB name took the gateway to 3.1 GB
and 17 s of CPU. Tar headers are therefore parsed here, block by block, and each size is
charged to the budget before a byte of it is read. Zips are read with `zipfile` after their
declared entry count and sizes are checked.
"""

from __future__ import annotations

import bz2
import io
import lzma
import time
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

BLOCK = 512
# The longest GNU long name/link (PATH_MAX is 4096) and pax record set read from a tar;
# a header that declares more refuses the archive before any of it is read.
MAX_LONG_NAME = 64 * 1024
MAX_PAX_HEADER = 1024 * 1024
# xz -9 needs 65 MiB to decompress; a stream that declares a larger dictionary is refused.
XZ_MEMLIMIT = 80 * 1024 * 1024
# A zip entry that expands more than this many times and to more than 1 MiB is a bomb, not
# an image (JPEG, PNG and WebP barely compress; a blank BMP is the rare casualty).
MAX_ZIP_RATIO = 100
_CHUNK = 256 * 1024


class ArchiveError(ValueError):
    """The archive is malformed (bad checksum, bad number, truncated)."""


class OutOfTime(Exception):
    """The request's archives took longer than its CPU budget to expand."""


class Budget:
    """What one request may expand to, across all its files and archives.

    `max_cpu_s` counts the CPU time of the thread that made the budget (the one reading the
    request): bz2 inflates at 6-30 MiB/s here, so MAX_ARCHIVE_BYTES alone allows minutes.
    """

    def __init__(self, *, max_entries: int, max_bytes: int, max_cpu_s: float = 60.0) -> None:
        self.max_entries, self.max_bytes, self.max_cpu_s = max_entries, max_bytes, max_cpu_s
        self.entries = 0
        self.bytes = 0
        self._cpu0 = time.thread_time()

    def check_time(self) -> None:
        """OutOfTime once the CPU budget is spent."""
        if time.thread_time() - self._cpu0 > self.max_cpu_s:
            raise OutOfTime(f"expanding took over {self.max_cpu_s:g} CPU seconds")

    def count(self) -> bool:
        """Charge one archive entry; False when that is one too many."""
        self.entries += 1
        return self.entries <= self.max_entries

    def charge(self, size: int) -> bool:
        """Charge `size` bytes about to be read; False (nothing charged) when they do not fit."""
        if size < 0 or self.bytes + size > self.max_bytes:
            return False
        self.bytes += size
        return True


class _Inflate(io.RawIOBase):
    """A decompressed view of a gzip/bz2/xz stream; output is produced only as it is read."""

    def __init__(self, raw: BinaryIO, kind: str, budget: Budget) -> None:
        self.raw, self.kind, self.budget = raw, kind, budget
        self._pending = b""
        self._d = self._new()

    def _new(self) -> Any:
        if self.kind == "gz":
            return zlib.decompressobj(wbits=31)
        if self.kind == "bz2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor(memlimit=XZ_MEMLIMIT)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        self.budget.check_time()
        while True:
            if self._d.eof:
                rest = bytes(self._d.unused_data) or self.raw.read(_CHUNK)
                if not rest:
                    return 0
                self._d, self._pending = self._new(), rest  # concatenated streams
            if not self._pending and (self.kind == "gz" or self._d.needs_input):
                self._pending = self.raw.read(_CHUNK)
                if not self._pending:
                    raise ArchiveError("the compressed stream is truncated")
            out = self._decompress(len(view))
            if out:
                view[: len(out)] = out
                return len(out)

    def _decompress(self, size: int) -> bytes:
        data, self._pending = self._pending, b""
        if self.kind == "gz":
            out: bytes = self._d.decompress(data, size)
            self._pending = self._d.unconsumed_tail
            return out
        return bytes(self._d.decompress(data, max_length=size))


def _compression(head: bytes) -> str | None:
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return None


def open_tar_stream(fileobj: BinaryIO, budget: Budget | None = None) -> BinaryIO:
    """The decompressed bytes of a (possibly gzip/bz2/xz-compressed) tar, read lazily."""
    fileobj.seek(0)
    kind = _compression(fileobj.read(6))
    fileobj.seek(0)
    if kind is None:
        return fileobj
    budget = budget or Budget(max_entries=0, max_bytes=0)
    return io.BufferedReader(_Inflate(fileobj, kind, budget), _CHUNK)


def kind_of(fileobj: BinaryIO) -> str | None:
    """'zip' or 'tar' when the file is such an archive, judged by content, never by name."""
    fileobj.seek(0)
    head = fileobj.read(BLOCK)
    fileobj.seek(0)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if _compression(head):
        try:
            head = open_tar_stream(fileobj).read(BLOCK)  # one block: bounded work
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError):
            return None
        finally:
            fileobj.seek(0)
    if len(head) == BLOCK and (head[257:262] == b"ustar" or _checksum_ok(head)):
        return "tar"
    return None


def _number(field: bytes) -> int:
    """A tar numeric field: octal text, or GNU base-256 for large values."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value if field[0] == 0x80 else value - (1 << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise ArchiveError(f"invalid number in tar header: {text[:20]!r}") from None


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except ArchiveError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    return stored in (unsigned, signed) and any(block)


def _read(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ArchiveError("the tar archive is truncated")
    return data


def _skip(stream: BinaryIO, size: int) -> None:
    while size > 0:
        got = len(stream.read(min(size, _CHUNK)))
        if not got:
            raise ArchiveError("the tar archive is truncated")
        size -= got


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax header ("LEN key=value\\n" each)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise ArchiveError("invalid pax header")
        end = pos + int(data[pos:space])
        if end <= space or end > len(data) or data[end - 1 : end] != b"\n":
            raise ArchiveError("invalid pax header")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise ArchiveError("invalid pax header")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


def tar_entries(
    fileobj: BinaryIO, *, budget: Budget, max_file_bytes: int
) -> Iterator[tuple[str, bytes | None, str]]:
    """(name, bytes or None, why-not) for each tar entry; stops at the first budget breach."""
    stream = open_tar_stream(fileobj, budget)
    seekable = stream is fileobj  # an uncompressed tar on disk: skipping costs nothing
    long_name: str | None = None
    long_link = False
    pax: dict[str, str] = {}
    while True:
        budget.check_time()
        if not budget.charge(BLOCK):
            yield "", None, "archive_too_large"
            return
        block = stream.read(BLOCK)
        if len(block) < BLOCK or not any(block):
            return  # end of archive (two zero blocks, or one, or EOF: tarfile reads it so)
        if not _checksum_ok(block):
            raise ArchiveError("a tar header's checksum does not match")
        kind = block[156:157]
        size = _number(block[124:136])
        if size < 0:
            raise ArchiveError("a tar header declares a negative size")
        if kind in (b"L", b"K", b"x", b"g"):
            cap = MAX_LONG_NAME if kind in (b"L", b"K") else MAX_PAX_HEADER
            if size > cap or not budget.charge(_padded(size)):
                yield "", None, "archive_header_too_large"
                return
            data = _read(stream, _padded(size))[:size]
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"K":
                long_link = True
            elif kind == b"x":
                pax = _pax(data)
            continue  # global pax records ('g') are charged, read and not applied
        name = _header_name(block)
        name = pax.get("path") or long_name or name
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise ArchiveError("invalid size in pax header") from None
        long_name, pax, linked, long_link = None, {}, long_link, False
        if not budget.count():
            yield name, None, "archive_too_many_entries"
            return
        why = _why_not(kind, name, linked)
        if not why and size > max_file_bytes:
            why = "archive_too_large"
        if not budget.charge(_padded(size)):  # declared, charged before it is read
            yield name, None, "archive_too_large"
            return
        if why:
            if seekable:
                stream.seek(_padded(size), io.SEEK_CUR)
            else:
                _skip(stream, _padded(size))
            if why != "directory":
                yield name, None, why
            continue
        yield name, _read(stream, _padded(size))[:size], ""


def _header_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\x00":  # POSIX ustar: a prefix field (GNU uses it otherwise)
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _why_not(kind: bytes, name: str, linked: bool) -> str:
    """'' for a regular file, else why the entry is not read."""
    if kind in (b"1", b"2") or linked:
        return "archive_link"
    if kind == b"5" or (kind in (b"0", b"\0") and name.endswith("/")):
        return "directory"
    if kind in (b"0", b"\0", b"7"):
        return ""
    return "archive_special_file"


def zip_entries(
    fileobj: BinaryIO, *, budget: Budget, max_file_bytes: int
) -> Iterator[tuple[str, bytes | None, str]]:
    """(name, bytes or None, why-not) for each zip entry, sizes checked before extracting."""
    # zipfile lists the whole central directory first (~0.5 KB of Python objects a record):
    # the record count the archive declares is checked before that.
    fileobj.seek(0)
    end = zipfile._EndRecData(fileobj)  # type: ignore[attr-defined]
    if end is None:
        raise zipfile.BadZipFile("no end of central directory record")
    declared = end[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
    if declared > 2 * (budget.max_entries - budget.entries) + 16:
        yield f"({declared} entries)", None, "archive_too_many_entries"
        return
    with zipfile.ZipFile(fileobj) as zf:
        for info in zf.infolist():
            budget.check_time()
            if not info.filename:  # no name at all: nothing safe to call it
                yield "", None, "unsafe_path"
                continue
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                yield info.filename, None, "archive_link"
                continue
            if not budget.count():
                yield info.filename, None, "archive_too_many_entries"
                return
            size = info.file_size
            bomb = size > 1024 * 1024 and size > MAX_ZIP_RATIO * max(1, info.compress_size)
            if size > max_file_bytes or bomb or not budget.charge(size):
                yield info.filename, None, "archive_too_large"
                continue
            body = bytearray()
            with zf.open(info) as fh:  # zipfile stops at the declared size (and checks CRC)
                while chunk := fh.read(_CHUNK):
                    body += chunk
                    budget.check_time()
            yield info.filename, bytes(body), ""  # zipfile stops at `size` bytes
