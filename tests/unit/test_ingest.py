"""Upload validation: formats, limits, archive safety (no services needed)."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import time
import tracemalloc
import zipfile

import pytest

from services.gateway.archives import Budget
from services.gateway.ingest import Candidate, Limits, Rejection, clean_filename, expand
from tests.hostile_files import header_bomb, zip_bomb
from tests.images import encode, make_image

LIMITS = Limits(
    max_file_bytes=1_000_000,
    max_image_pixels=4_000_000,
    max_archive_entries=10,
    max_archive_bytes=3_000_000,
)


def codes(filename: str, data: bytes, limits: Limits = LIMITS) -> list[str]:
    return [r.code if isinstance(r, Rejection) else "ok" for r in expand(filename, data, limits)]


def test_plain_images_pass_with_their_size() -> None:
    (found,) = expand("a.png", encode(make_image(1, size=(30, 20)), "PNG"), LIMITS)
    assert isinstance(found, Candidate) and (found.width, found.height) == (30, 20)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"just some text", "not_an_image"),
        (b"%PDF-1.4 fake", "not_an_image"),
    ],
)
def test_non_images_are_refused(data: bytes, code: str) -> None:
    assert codes("x.jpg", data) == [code]


def test_pixel_bombs_are_refused_before_decoding() -> None:
    bomb = encode(make_image(2, size=(2100, 2100)), "PNG")  # 4.4 MP > 4 MP limit
    assert codes("bomb.png", bomb) == ["image_too_large"]


def test_unsupported_formats_are_named() -> None:
    data = encode(make_image(3, size=(16, 16)), "ICO")
    assert codes("x.ico", data) == ["unsupported_format"]


def test_zip_entries_are_checked_one_by_one() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok/a.jpg", encode(make_image(4)))
        zf.writestr("/abs.jpg", encode(make_image(5)))
        zf.writestr("a/../../up.jpg", encode(make_image(6)))
        zf.writestr("nested.tar", _tar({"x.jpg": encode(make_image(7))}))
        zf.writestr("__MACOSX/._a.jpg", b"junk")
        zf.writestr("readme.txt", b"not an image")
    assert codes("set.zip", buf.getvalue()) == [
        "ok",
        "unsafe_path",
        "unsafe_path",
        "nested_archive",
        "not_an_image",
    ]


def test_zip_bombs_hit_the_expansion_limits() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(4):
            zf.writestr(f"z{i}.bin", b"\0" * 900_000)  # compresses to ~1 KB each
    got = codes("bomb.zip", buf.getvalue())
    assert got.count("archive_too_large") >= 1 and len(buf.getvalue()) < 50_000
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(30):
            zf.writestr(f"{i}.jpg", b"x")
    got = codes("many.zip", many.getvalue())
    assert got[-1] == "archive_too_many_entries" and len(got) == LIMITS.max_archive_entries + 1


def test_tar_links_and_devices_are_not_followed() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("l.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("h.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "l.jpg"
        tf.addfile(hard)
        fifo = tarfile.TarInfo("f.jpg")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
    assert codes("t.tar", buf.getvalue()) == [
        "archive_link",
        "archive_link",
        "archive_special_file",
    ]


def test_corrupt_archive_is_one_rejection() -> None:
    assert codes("broken.zip", b"PK\x03\x04" + b"\x00" * 100) == ["bad_archive"]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a/b.jpg", "a/b.jpg"),
        ("/etc/x.jpg", "etc/x.jpg"),
        ("c:\\dir\\x.jpg", "c:/dir/x.jpg"),
        ("bad\x00\x07name\n.jpg", "badname.jpg"),
        (b"caf\xe9.jpg", "caf\ufffd.jpg"),
        ("", "unnamed"),
    ],
)
def test_filenames_are_cleaned(raw: str | bytes, clean: str) -> None:
    assert clean_filename(raw) == clean


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["L", "x"])
def test_tar_headers_declaring_gigabytes_are_refused_unread(kind: str) -> None:
    """A 2 KB bz2 tar whose long-name or pax header declares 256 MiB: refused at the header,
    without reading it (tarfile read all 256 MiB into memory first)."""
    data = header_bomb(kind, declared=256 * 1024 * 1024)
    assert len(data) < 4096
    tracemalloc.start()
    try:
        start = time.perf_counter()
        got = list(expand("x.tar", data, LIMITS))
        took = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.filename, r.code) for r in got if isinstance(r, Rejection)] == [
        ("x.tar", "archive_header_too_large")
    ]
    assert peak < 8 * 1024 * 1024 and took < 1.0


def test_tar_long_names_and_pax_paths_within_limits_are_read() -> None:
    jpg = encode(make_image(11))
    long = "d/" + "n" * 150 + ".jpg"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz", format=fmt) as tf:
            info = tarfile.TarInfo(long)
            info.size = len(jpg)
            tf.addfile(info, io.BytesIO(jpg))
            tf.addfile(tarfile.TarInfo("dir/"), None)
        (found,) = expand("t.tar.xz", buf.getvalue(), LIMITS)
        assert isinstance(found, Candidate) and found.filename == f"t.tar.xz/{long}"
        assert found.data == jpg


def test_one_budget_across_the_request() -> None:
    """Two archives of 2 MB each against a 3 MB budget: the second runs out (budgets used
    to reset per archive)."""
    files = {f"{i}.bin": bytes([i]) * 500_000 for i in range(4)}
    budget = Budget(max_entries=100, max_bytes=LIMITS.max_archive_bytes)
    first = [
        r.code for r in expand("a.tar", _tar(files), LIMITS, budget) if isinstance(r, Rejection)
    ]
    second = [
        r.code for r in expand("b.tar", _tar(files), LIMITS, budget) if isinstance(r, Rejection)
    ]
    assert first == ["not_an_image"] * 4
    assert "archive_too_large" in second and budget.bytes <= LIMITS.max_archive_bytes


def test_zip_bombs_are_refused_by_declared_size_and_ratio() -> None:
    big = zip_bomb(entries=5, size=200 * 1024 * 1024)  # each entry over max_file_bytes
    assert codes("big.zip", big) == ["archive_too_large"] * 5
    dense = zip_bomb(entries=2, size=1024 * 1024)  # 1 MiB: small enough for any ratio
    wide = dataclasses.replace(LIMITS, max_file_bytes=10_000_000)
    assert codes("small.zip", dense, wide) == ["not_an_image"] * 2
    ratio = zip_bomb(entries=2, size=2 * 1024 * 1024)
    assert codes("ratio.zip", ratio, wide) == ["archive_too_large"] * 2


def test_zip_declaring_too_many_records_is_refused_before_listing() -> None:
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(40):
            zf.writestr(f"d{i}/", b"")
    assert codes("dirs.zip", many.getvalue()) == ["archive_too_many_entries"]


def _ok(found: Candidate | Rejection) -> bool:
    return isinstance(found, Candidate)


def test_expansion_stops_at_the_cpu_budget() -> None:
    """bz2 inflates at 6-30 MiB/s here: MAX_ARCHIVE_BYTES alone would allow minutes of CPU."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i in range(8):
            info = tarfile.TarInfo(f"z{i}.bmp")
            info.size = 10_000_000
            tf.addfile(info, io.BytesIO(b"\0" * info.size))
    roomy = dataclasses.replace(
        LIMITS, max_file_bytes=20_000_000, max_archive_bytes=200_000_000, max_expand_cpu_s=0.01
    )
    got = codes("z.tar.gz", buf.getvalue(), roomy)
    assert got[-1] == "archive_too_slow" and len(got) < 8
    assert (
        codes("again.tar.gz", buf.getvalue(), dataclasses.replace(roomy, max_expand_cpu_s=60))[-1]
        == "not_an_image"
    )
