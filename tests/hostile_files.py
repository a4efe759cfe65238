"""Small uploads that expand hugely: tar headers that declare gigabytes, and zip bombs."""

from __future__ import annotations

import bz2
import io
import struct
import tarfile
import zlib
from functools import lru_cache

_MIB = 1024 * 1024
_PIECE = 64 * _MIB


@lru_cache(maxsize=1)
def _zeros_bz2() -> bytes:
    """64 MiB of zeros as one bz2 stream (~100 bytes): repeated, it makes any length."""
    return bz2.compress(b"\0" * _PIECE, 9)


def header_bomb(kind: str = "L", declared: int = 1536 * _MIB) -> bytes:
    """A bz2 tar (a few KB) whose first header, a GNU long name ('L') or a pax header ('x'),
    declares `declared` bytes and is followed by that many zero bytes."""
    info = tarfile.TarInfo("././@LongLink" if kind == "L" else "././@PaxHeader")
    info.type = tarfile.GNUTYPE_LONGNAME if kind == "L" else tarfile.XHDTYPE
    info.size = declared
    header = info.tobuf(format=tarfile.GNU_FORMAT if kind == "L" else tarfile.USTAR_FORMAT)
    # bzip2 streams concatenate: the header in the first, the zeros in the rest.
    pieces = -(-declared // _PIECE)
    return bz2.compress(header, 9) + _zeros_bz2() * pieces


@lru_cache(maxsize=4)
def zip_bomb(entries: int = 10, size: int = 200 * _MIB) -> bytes:
    """A zip whose entries each inflate to `size` zero bytes; one deflate stream, copied."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = b"".join(squeeze.compress(b"\0" * _MIB) for _ in range(size // _MIB))
    data += squeeze.flush()
    crc = 0
    for _ in range(size // _MIB):
        crc = zlib.crc32(b"\0" * _MIB, crc)
    out, central = io.BytesIO(), io.BytesIO()
    for i in range(entries):
        name = f"z{i}.bmp".encode()
        offset = out.tell()
        fields = (20, 0, 8, 0, 0x21, crc, len(data), size, len(name))
        out.write(struct.pack("<4s5HLLLHH", b"PK\x03\x04", *fields, 0) + name + data)
        central.write(
            struct.pack("<4s6HLLL5HLL", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0, offset) + name
        )
    start = out.tell()
    out.write(central.getvalue())
    tail = (0, 0, entries, entries, len(central.getvalue()), start, 0)
    out.write(struct.pack("<4s4HLLH", b"PK\x05\x06", *tail))
    return out.getvalue()
