"""Hostile and odd input through the real stack: what is indexed, refused, or 4xx (never 5xx).

Cases already covered elsewhere are not repeated here: zero-byte files, text named .jpg,
truncated JPEGs, '..' and nested archives, tar links (test_jobs_api); modes, EXIF and GIF
decoding (unit/test_decode); zip entry checks and limits on small numbers (unit/test_ingest).
"""

from __future__ import annotations

import io
import socket
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from services.stack import Stack
from shared.ml.images import decode_image
from tests.conftest import running_stack, stack_settings, upload, wait_for_job
from tests.hostile_files import header_bomb, zip_bomb
from tests.images import encode, make_image


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares width x height RGB pixels but holds only a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def job_hits(api: httpx.Client, job_id: str) -> list[dict]:
    params: dict[str, str | int] = {"q": "anything", "k": 100, "job_id": job_id}
    hits: list[dict] = api.get("/v1/search", params=params).raise_for_status().json()["hits"]
    return hits


def image_query(api: httpx.Client, image: Image.Image) -> list[dict]:
    png = encode(image.convert("RGB"), "PNG")
    response = api.post("/v1/search/image", files={"file": ("q.png", png)}, params={"k": 5})
    hits: list[dict] = response.raise_for_status().json()["hits"]
    return hits


def test_odd_but_valid_images_are_indexed(api: httpx.Client) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    sixteen = (np.arange(48 * 40).reshape(40, 48) * 30 % 65536).astype(np.uint16)
    palette = make_image(20003, size=(50, 40)).convert("P")
    frames = [make_image(20005, size=(40, 40)), make_image(20006, size=(40, 40))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files = [
        ("cmyk.jpg", encode(make_image(20001).convert("CMYK")), "image/jpeg"),
        ("deep.png", encode(Image.fromarray(sixteen), "PNG"), "image/png"),
        ("palette.png", encode(palette, "PNG", transparency=0), "image/png"),
        ("anim.gif", gif.getvalue(), "image/gif"),
        ("rotated.jpg", encode(make_image(20007, size=(60, 30)), exif=exif.tobytes()), None),
        ("photo.webp", encode(make_image(20008), "WEBP"), "image/webp"),
        ("scan.tiff", encode(make_image(20009), "TIFF"), "image/tiff"),
        # Judged by content, not by name or declared type: this JPEG is accepted.
        ("holiday", encode(make_image(20010)), "text/plain"),
    ]
    parts = [("files", (n, b, t) if t else (n, b)) for n, b, t in files]
    body = api.post("/v1/jobs", files=parts).raise_for_status().json()
    assert (body["total"], body["rejected"]) == (len(files), [])
    job = wait_for_job(api, body["job_id"])
    assert (job["state"], job["done"]) == ("succeeded", len(files)), job["errors"]
    hits = {h["filename"]: h for h in job_hits(api, body["job_id"])}
    assert set(hits) == {n for n, _, _ in files}
    assert (hits["rotated.jpg"]["width"], hits["rotated.jpg"]["height"]) == (30, 60)
    # An animated GIF is indexed by its first frame.
    first = decode_image(gif.getvalue(), max_pixels=10**6)
    top = image_query(api, first)[0]
    assert top["filename"] == "anim.gif" and top["score"] > 0.9999
    with Image.open(io.BytesIO(gif.getvalue())) as animation:
        animation.seek(1)
        second = animation.convert("RGB")
    other = [h for h in image_query(api, second) if h["filename"] == "anim.gif"]
    assert not other or other[0]["score"] < top["score"]


def test_images_refused_at_the_door_before_decoding(api: httpx.Client) -> None:
    bomb = png_header(30_000, 30_000)  # 900 megapixels in 80 bytes
    assert len(bomb) < 100
    buf = io.BytesIO()
    make_image(20011, size=(16, 16)).save(buf, "ICO")
    files = [
        ("bomb.png", bomb),
        ("huge.png", png_header(8_000, 8_000)),  # 64 MP: over MAX_IMAGE_PIXELS (60 MP)
        ("strip.png", png_header(60_000, 1)),  # few pixels, but CLIP would scale it to 3 GP
        ("icon.ico", buf.getvalue()),
        ("fake.jpg", b"hello, I am only text"),
        ("cut.png", encode(make_image(20012), "PNG")[:20]),
    ]
    started = time.monotonic()
    response = api.post("/v1/jobs", files=[("files", (n, b, "image/png")) for n, b in files])
    assert time.monotonic() - started < 10
    body = response.raise_for_status().json()
    assert {r["filename"]: r["code"] for r in body["rejected"]} == {
        "bomb.png": "image_too_large",
        "huge.png": "image_too_large",
        "strip.png": "image_too_large",
        "icon.ico": "unsupported_format",
        "fake.jpg": "not_an_image",
        "cut.png": "not_an_image",
    }
    job = wait_for_job(api, body["job_id"])
    assert (job["state"], job["total"], job["failed"]) == ("failed", 6, 6)


def test_archive_tricks_are_refused_entry_by_entry(api: httpx.Client) -> None:
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok/good.jpg", encode(make_image(20013)))
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (0o120777 << 16) | 0x20  # a symlink, as `zip --symlinks` stores it
        zf.writestr(link, "/etc/passwd")
        zf.writestr("/abs/root.jpg", encode(make_image(20014)))
        zf.writestr("C:\\Windows\\drive.jpg", encode(make_image(20015)))
        zf.writestr("inner.tar.gz", _tar_gz({"x.jpg": encode(make_image(20016))}))
        zf.writestr("zeros.jpg", b"\0" * (60 * 1024 * 1024))  # 60 MiB from ~60 KiB
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as tf:
        for name, data in [("/etc/abs.jpg", b"x"), ("a/../../up.jpg", b"y")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        fifo = tarfile.TarInfo("pipe.jpg")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
    assert len(zbuf.getvalue()) < 1024 * 1024
    uploads = [("set.zip", zbuf.getvalue()), ("more.tar", tbuf.getvalue())]
    body = upload(api, uploads).raise_for_status().json()
    assert sorted((r["filename"], r["code"]) for r in body["rejected"]) == [
        ("more.tar/a/up.jpg", "unsafe_path"),
        ("more.tar/etc/abs.jpg", "unsafe_path"),
        ("more.tar/pipe.jpg", "archive_special_file"),
        ("set.zip/C:/Windows/drive.jpg", "unsafe_path"),
        ("set.zip/abs/root.jpg", "unsafe_path"),
        ("set.zip/inner.tar.gz", "nested_archive"),
        ("set.zip/link.jpg", "archive_link"),
        ("set.zip/zeros.jpg", "archive_too_large"),
    ]
    job = wait_for_job(api, body["job_id"])
    assert (job["total"], job["done"], job["failed"]) == (9, 1, 8)


def test_filenames_of_any_bytes_are_stored_clean(api: httpx.Client) -> None:
    names = {
        b"dir/sub\\name.jpg": "dir/sub/name.jpg",
        b"ctl\x01\x1b[31m\x7fname.jpg": "ctl[31mname.jpg",
        b"caf\xc3\xa9.jpg": "caf\u00e9.jpg",
        b"bad\xff\xfe.jpg": "bad\u00ff\u00fe.jpg",  # not UTF-8: read as Latin-1
        b"../../etc/passwd.jpg": "etc/passwd.jpg",
        "\u202egpj.exe".encode(): "gpj.exe",  # a right-to-left override would show exe.jpg
        b"": "unnamed",
    }
    parts = [(raw, encode(make_image(20020 + i))) for i, raw in enumerate(names)]
    body, ctype = _multipart(parts)
    response = api.post("/v1/jobs", content=body, headers={"content-type": ctype})
    created = response.raise_for_status().json()
    assert (created["total"], created["rejected"]) == (len(names), [])
    job = wait_for_job(api, created["job_id"])
    assert job["done"] == len(names)
    stored = sorted(h["filename"] for h in job_hits(api, created["job_id"]))
    assert stored == sorted(names.values())


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "invalid_metadata"),  # deeper than Python
        ('{"a": NaN}', "invalid_metadata"),
        ('{"a": 1e400}', "invalid_metadata"),
        ('{"a": 123456789012345678901234567890}', "invalid_metadata"),
        ('"just a string"', "invalid_metadata"),
        ("{not json", "invalid_metadata"),
        ('{"a": "' + "x" * 17_000 + '"}', "invalid_metadata"),  # over MAX_METADATA_BYTES
        ('{"a": "' + "x" * 200_000 + '"}', "invalid_metadata"),  # over the form part limit
    ],
)
def test_bad_or_huge_metadata_is_422(api: httpx.Client, metadata: str, code: str) -> None:
    response = upload(api, [("m.jpg", encode(make_image(20030)))], metadata=metadata)
    assert (response.status_code, response.json()["code"]) == (422, code)


def test_search_input_edges(api: httpx.Client) -> None:
    def status(response: httpx.Response) -> tuple[int, str | None]:
        body = response.json()
        return response.status_code, body.get("code")

    assert status(api.post("/v1/search", json={"text": ""})) == (422, "invalid_request")
    assert status(api.post("/v1/search", json={"text": " \n\t"})) == (422, "invalid_request")
    long = api.post("/v1/search", json={"text": "a red square " * 800, "k": 2})
    assert long.status_code == 200 and len(long.json()["query"]) > 10_000
    too_long = api.post("/v1/search", json={"text": "x" * 100_001})
    assert status(too_long) == (422, "invalid_request")
    bad_params: list[dict[str, str | int | float]] = [
        {"k": 201},
        {"k": -1},
        {"k": "ten"},
        {"min_score": -1.5},
        {"min_score": "nan"},
    ]
    for params in bad_params:
        assert api.get("/v1/search", params={"q": "x", **params}).status_code == 422, params
    for body in [{"text": "x", "k": 0}, {"text": "x", "min_score": 1.01}, {"text": 5}, []]:
        assert api.post("/v1/search", json=body).status_code == 422, body
    broken = api.post("/v1/search", content=b"{", headers={"content-type": "application/json"})
    assert status(broken) == (422, "invalid_request")
    crafted = [
        '" || true || "',
        '\\" or job_id != "',
        'x"]) or json_contains(metadata["tags"], "',
        "line\nbreak",
        "nul\x00byte",
        "\u2028\u00e9\U0001f600",
    ]
    for tag in crafted:
        response = api.get("/v1/search", params={"q": "x", "tag": tag})
        assert (response.status_code, response.json()["hits"]) == (200, []), tag
    bad_job = api.post("/v1/search", json={"text": "x", "filters": {"job_id": '" or 1==1 or "'}})
    assert status(bad_job) == (422, "invalid_request")


def test_oversized_bodies_are_refused_before_reading(api: httpx.Client, stack: Stack) -> None:
    # A declared 600 MB upload is refused from its headers; nothing of it is sent.
    url = urlparse(stack.gateway_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 600000000\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(4096):  # the server closes the connection after its answer
            reply += chunk
    reply_text = reply.decode()
    assert reply_text.startswith("HTTP/1.1 413") and '"payload_too_large"' in reply_text
    big_json = api.post("/v1/search", json={"text": "x" * (3 * 1024 * 1024)})
    assert (big_json.status_code, big_json.json()["code"]) == (413, "payload_too_large")


def test_hostile_archives_at_once_cost_little_memory(api: httpx.Client, stack: Stack) -> None:
    """Six bz2 tars of ~2 KB whose long-name or pax header declares 1.5 GiB, and a zip bomb,
    all at once: each is refused at its header, and the gateway's peak RSS barely moves
    (one such tar used to take it from 0.2 to 3.1 GB and 17-39 s of a core)."""
    pid = stack.procs["gateway"].pid
    files = [("x.tar", header_bomb("L"))] * 3 + [("y.tar", header_bomb("x"))] * 3
    files.append(("bomb.zip", zip_bomb()))
    before = _rss_mib(pid, "VmRSS")

    def send(item: tuple[str, bytes]) -> httpx.Response:
        for _ in range(20):  # past MAX_CONCURRENT_UPLOADS: 503 and Retry-After, as clients do
            answer = api.post("/v1/jobs", files=[("files", item)])
            if answer.status_code != 503:
                return answer
            assert answer.json()["code"] == "too_many_uploads"
            time.sleep(float(answer.headers["Retry-After"]) / 4)
        return answer

    start = time.monotonic()
    with ThreadPoolExecutor(len(files)) as pool:
        answers = list(pool.map(send, files))
    assert time.monotonic() - start < 20
    for (name, _), answer in zip(files, answers, strict=True):
        assert answer.status_code == 202, answer.text
        codes = {r["code"] for r in answer.json()["rejected"]}
        assert codes == {"archive_too_large" if name == "bomb.zip" else "archive_header_too_large"}
    assert _rss_mib(pid, "VmHWM") - before < 200


def _rss_mib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) // 1024
    raise AssertionError(f"no {key} for {pid}")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[httpx.Client]:
    """A private stack with small request limits."""
    env = stack_settings(
        tmp_path_factory.mktemp("small"),
        tiny_model,
        MAX_UPLOAD_BYTES="300000",
        MAX_FILES_PER_JOB="4",
        MAX_ARCHIVE_ENTRIES="3",
        MAX_ARCHIVE_BYTES="200000",
        RATE_LIMIT_UPLOADS="",
    )
    with running_stack(env) as stack, httpx.Client(base_url=stack.gateway_url, timeout=60) as c:
        yield c


def test_request_size_limit_with_and_without_content_length(small: httpx.Client) -> None:
    big = [("noise.bin", np.random.default_rng(1).bytes(400_000))]
    sized = upload(small, big)
    assert (sized.status_code, sized.json()["code"]) == (413, "payload_too_large")
    body, ctype = _multipart([(b"noise.bin", big[0][1])])

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    chunked = small.post("/v1/jobs", content=chunks(), headers={"content-type": ctype})
    assert (chunked.status_code, chunked.json()["code"]) == (413, "payload_too_large")
    assert upload(small, [("ok.jpg", encode(make_image(20040)))]).status_code == 202


def test_too_many_files_and_archive_limits(small: httpx.Client) -> None:
    five = [(f"f{i}.jpg", encode(make_image(20041 + i, size=(32, 32)))) for i in range(5)]
    many = upload(small, five)
    assert (many.status_code, many.json()["code"]) == (413, "too_many_files")
    expands = upload(small, [("three.zip", _zip({f"{i}.jpg": b"x" for i in range(3)})), *five[:2]])
    assert (expands.status_code, expands.json()["code"]) == (413, "too_many_files")
    entries = upload(small, [("five.zip", _zip({f"{i}.jpg": b"x" for i in range(5)}))])
    assert [r["code"] for r in entries.json()["rejected"]][-1] == "archive_too_many_entries"
    zeros = {f"z{i}.jpg": b"\0" * 90_000 for i in range(3)}  # 270 KB expanded, 1 KB sent
    total = upload(small, [("zeros.zip", _zip(zeros))]).json()
    assert [r["code"] for r in total["rejected"]] == [
        "not_an_image",
        "not_an_image",
        "archive_too_large",
    ]


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _multipart(parts: list[tuple[bytes, bytes]]) -> tuple[bytes, str]:
    """A multipart body with the filename bytes exactly as given (httpx would encode them)."""
    boundary = b"hostile-boundary-7f3a"
    out = io.BytesIO()
    for filename, data in parts:
        out.write(b"--" + boundary + b"\r\n")
        out.write(b'Content-Disposition: form-data; name="files"; filename="' + filename + b'"\r\n')
        out.write(b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    out.write(b"--" + boundary + b"--\r\n")
    return out.getvalue(), f"multipart/form-data; boundary={boundary.decode()}"
