"""Spool a multipart upload to one temporary file on disk, whatever its size or file count.

Starlette keeps each file part under 1 MiB in memory (and one open file per larger part), and
the route used to read every file whole: a 512 MiB body of small images was held in memory.
Here every file part is appended to one unlinked temporary file; what stays in memory is the
parser's state, the form fields (capped) and one (name, offset, length) per file.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from fastapi.concurrency import run_in_threadpool
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from shared.errors import InvalidInput, PayloadTooLarge


class _Region(io.RawIOBase):
    """A read-only, seekable window onto the spool file (os.pread: no shared file position)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.length - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos) if n else b""
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos


@dataclass
class SpooledForm:
    """The upload's file parts (as seekable readers over the spool) and its text fields."""

    spool: BinaryIO
    files: list[tuple[str, BinaryIO]] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)

    def close(self) -> None:
        self.spool.close()


def _decode(raw: bytes) -> str:
    """UTF-8, else Latin-1 (what Starlette does: any bytes make some name)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    offset: int = 0
    value: bytearray = field(default_factory=bytearray)


async def spool_form(
    content_type: str,
    stream: AsyncIterator[bytes],
    *,
    field_name: str,
    max_files: int,
    max_fields: int,
    max_field_bytes: int,
) -> SpooledForm:
    """Read a multipart body: parts named `field_name` with a filename go to the spool."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    form = SpooledForm(spool=tempfile.TemporaryFile())  # noqa: SIM115 (closed by the caller)
    if kind != b"multipart/form-data":
        return form  # no files in it (the caller says so); the body is left unread
    if not boundary:
        form.close()
        raise InvalidInput("multipart/form-data without a boundary", code="bad_multipart")
    part = _Part()
    header: list[bytes] = [b"", b""]
    counts = {"files": 0, "fields": 0}

    def on_part_begin() -> None:
        nonlocal part
        part = _Part(offset=form.spool.tell())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        part.headers[header[0].lower()] = header[1]
        header[0] = header[1] = b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = _decode(options.get(b"name", b""))
        if b"filename" in options:
            part.filename = _decode(options[b"filename"])
            counts["files"] += 1
            if counts["files"] > max_files:
                raise PayloadTooLarge(
                    f"a job holds at most {max_files} files", code="too_many_files"
                )
        else:
            counts["fields"] += 1
            if counts["fields"] > max_fields:
                raise InvalidInput(f"more than {max_fields} form fields", code="bad_multipart")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.filename is not None:
            if part.name == field_name:
                form.spool.write(data[start:end])
            return
        part.value += data[start:end]
        if len(part.value) > max_field_bytes:
            raise InvalidInput(
                f"a form field is over {max_field_bytes} bytes (metadata is the only one)",
                code="invalid_metadata",
            )

    def on_part_end() -> None:
        if part.filename is None:
            form.fields.setdefault(part.name, []).append(_decode(bytes(part.value)))
        elif part.name == field_name:
            size = form.spool.tell() - part.offset
            # Unbuffered (a BufferedReader holds 8 KiB each: 160 MiB for 20,000 files).
            reader = cast(BinaryIO, _Region(form.spool.fileno(), part.offset, size))
            form.files.append((part.filename, reader))

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in stream:
            if chunk:  # the writes block on disk now and then: not on the event loop
                await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except MultipartParseError as exc:
        form.close()
        raise InvalidInput(f"cannot read the upload: {exc}", code="bad_multipart") from exc
    except BaseException:
        form.close()
        raise
    form.spool.flush()
    return form
