"""POST /v1/jobs in process (TestClient): the body is spooled, hostile headers are cheap, and
uploads beyond MAX_CONCURRENT_UPLOADS are refused before their body is read."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient

from services.gateway.main import Gateway, app
from services.gateway.spool import spool_form
from services.stack import Stack
from shared.blobs import BlobStore
from shared.settings import Settings
from tests.hostile_files import header_bomb, zip_bomb
from tests.images import encode, make_image


class GatedBlobs(BlobStore):
    """Local blobs whose puts wait until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered, self.gate = threading.Event(), threading.Event()

    def put(self, data: bytes) -> str:
        self.entered.set()
        assert self.gate.wait(30)
        return super().put(data)


@pytest.fixture
def client(stack: Stack, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        redis_url=stack.settings.redis_url,
        milvus_uri=stack.settings.milvus_uri,
        milvus_collection=stack.settings.milvus_collection,
        data_dir=tmp_path,
        max_concurrent_uploads=1,
        rate_limit_uploads="",
    )
    with TestClient(app) as c:  # the lifespan would build its own Gateway: set it after
        app.state.gw = Gateway(settings)
        yield c


def test_uploads_beyond_the_limit_get_503_with_retry_after(client: TestClient) -> None:
    g = app.state.gw
    g.blobs = GatedBlobs(g.settings.data_dir / "blobs")
    first: dict[str, int] = {}
    jpg = encode(make_image(31))

    def slow() -> None:
        first["status"] = client.post("/v1/jobs", files=[("files", ("a.jpg", jpg))]).status_code

    worker = threading.Thread(target=slow)
    worker.start()
    try:
        assert g.blobs.entered.wait(30)  # the first upload holds the only slot
        busy = client.post("/v1/jobs", files=[("files", ("b.jpg", jpg))])
        assert busy.status_code == 503 and busy.json()["code"] == "too_many_uploads"
        assert busy.headers["Retry-After"] == "2"
    finally:
        g.blobs.gate.set()
        worker.join(30)
    assert first["status"] == 202
    again = client.post("/v1/jobs", files=[("files", ("c.jpg", encode(make_image(32))))])
    assert again.status_code == 202  # the slot was given back


def test_hostile_archives_are_refused_quickly(client: TestClient) -> None:
    files = [
        ("files", ("x.tar", header_bomb("L"))),  # 1.5 GiB long name in ~3 KB
        ("files", ("y.tar", header_bomb("x"))),  # 1.5 GiB pax header
        ("files", ("bomb.zip", zip_bomb())),  # 10 x 200 MiB
        ("files", ("ok.jpg", encode(make_image(33)))),
    ]
    start = time.perf_counter()
    answer = client.post("/v1/jobs", files=files)
    took = time.perf_counter() - start
    assert answer.status_code == 202, answer.text
    got = [(r["filename"], r["code"]) for r in answer.json()["rejected"]]
    assert got[:2] == [
        ("x.tar", "archive_header_too_large"),
        ("y.tar", "archive_header_too_large"),
    ]
    assert got[2:] == [(f"bomb.zip/z{i}.bmp", "archive_too_large") for i in range(10)]
    assert answer.json()["total"] == 13 and took < 5


def test_the_body_is_spooled_to_disk_not_memory() -> None:
    """40 MB of small files (each under Starlette's 1 MiB in-memory spool) cost little memory."""
    boundary = b"b0undary"
    part = b"\xab" * 40_000

    async def body() -> AsyncIterator[bytes]:
        for i in range(1000):
            yield (
                b"--" + boundary + b"\r\n"
                b'Content-Disposition: form-data; name="files"; filename="f%d.bin"\r\n\r\n'
                % i
                + part
                + b"\r\n"
            )
        yield b'--b0undary\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{"a": 1}\r\n'
        yield b"--" + boundary + b"--\r\n"

    async def parse() -> tuple[int, int, bytes, list[str]]:
        form = await spool_form(
            "multipart/form-data; boundary=b0undary",
            body(),
            field_name="files",
            max_files=2000,
            max_fields=10,
            max_field_bytes=1000,
        )
        try:
            last = form.files[-1][1].read()
            return (
                len(form.files),
                tracemalloc.get_traced_memory()[1],
                last,
                form.fields["metadata"],
            )
        finally:
            form.close()

    tracemalloc.start()
    try:
        count, peak, last, meta = anyio.run(parse)
    finally:
        tracemalloc.stop()
    assert count == 1000 and last == part and meta == ['{"a": 1}']
    assert peak < 8 * 1024 * 1024  # 40 MB went through
