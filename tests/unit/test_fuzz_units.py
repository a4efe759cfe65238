"""Property tests: archive expansion never raises; filter literals never inject (real Milvus)."""

from __future__ import annotations

import io
import tarfile
import uuid
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.ingest import _WHY, Candidate, Limits, Rejection, clean_filename, expand
from shared.vectors import SearchFilters, VectorStore
from tests.images import encode, make_image

pytestmark = pytest.mark.slow  # long property searches

LIMITS = Limits(
    max_file_bytes=50_000, max_image_pixels=40_000, max_archive_entries=8, max_archive_bytes=120_000
)
CODES = {
    *_WHY,
    "bad_archive",
    "empty_file",
    "file_too_large",
    "image_too_large",
    "not_an_image",
    "unsupported_format",
}
IMAGES = [
    encode(make_image(23000, size=(40, 30))),
    encode(make_image(23001, size=(30, 40)), "PNG"),
    encode(make_image(23002, size=(300, 300)), "PNG"),  # over the pixel limit
]
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

names = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["a", "..", ".", "", "/", "\\", "C:", "b.jpg", "\x00", "é"])).map(
        "/".join
    ),
)
bodies = st.one_of(st.binary(max_size=3000), st.sampled_from(IMAGES), st.just(b"\0" * 60_000))


def check(filename: str, data: bytes) -> None:
    """What `expand` must hold for any input: no exception, only typed, clean results."""
    found = list(expand(clean_filename(filename), data, LIMITS))  # as submit_job calls it
    assert found
    for item in found:
        assert isinstance(item, Candidate | Rejection)
        parts = item.filename.split("/")
        assert ".." not in parts and not item.filename.startswith("/")
        assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in item.filename)
        if isinstance(item, Rejection):
            assert item.code in CODES, item
        else:
            assert item.width * item.height <= LIMITS.max_image_pixels
            assert 0 < len(item.data) <= LIMITS.max_file_bytes


@FAST
@given(filename=st.text(max_size=30), data=bodies)
def test_expand_takes_any_single_file(filename: str, data: bytes) -> None:
    check(filename, data)


@st.composite
def zips(draw: st.DrawFn) -> bytes:
    buf = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2]))
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        entries = draw(st.lists(st.tuples(names, bodies, st.booleans()), max_size=12))
        for name, body, link in entries:
            info = zipfile.ZipInfo(name or "unnamed")
            if link:
                info.external_attr = 0o120777 << 16
            zf.writestr(info, body)
    return corrupt(draw, buf.getvalue())


@st.composite
def tars(draw: st.DrawFn) -> bytes:
    buf = io.BytesIO()
    mode = draw(st.sampled_from(["w", "w:gz"]))
    kinds = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE])
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, body, kind in draw(st.lists(st.tuples(names, bodies, kinds), max_size=10)):
            info = tarfile.TarInfo(name or "unnamed")
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
            else:
                info.linkname = name
                tf.addfile(info)
    return corrupt(draw, buf.getvalue())


def corrupt(draw: st.DrawFn, data: bytes) -> bytes:
    """Often the archive as made; else cut short, or with a few bytes overwritten."""
    how = draw(st.sampled_from(["keep", "keep", "cut", "flip"]))
    if how == "cut" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip" and data:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    return data


@pytest.mark.filterwarnings("ignore:Duplicate name")  # duplicate entries are part of the test
@FAST
@given(data=zips())
def test_expand_takes_any_zip(data: bytes) -> None:
    check("set.zip", data)


@FAST
@given(data=tars())
def test_expand_takes_any_tar(data: bytes) -> None:
    check("set.tar.gz", data)


@pytest.fixture(scope="module")
def tagged(milvus_uri: str) -> VectorStore:
    store = VectorStore(uri=milvus_uri, token=None, collection=f"fuzz_{uuid.uuid4().hex[:8]}")
    store.ensure_collection(dim=4)
    return store


# Any text but lone surrogates, which no JSON or UTF-8 carries.
tag_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(tags=st.lists(tag_text, min_size=1, max_size=6, unique=True))
def test_a_tag_filter_finds_exactly_its_rows(tagged: VectorStore, tags: list[str]) -> None:
    run = uuid.uuid4().hex[:8]
    rows = []
    for i, tag in enumerate(tags):
        vec = np.random.default_rng(i).random(4).astype(np.float32) + 0.1
        rows.append(
            {
                "image_id": f"{run}-{i}",
                "vector": (vec / np.linalg.norm(vec)).tolist(),
                "filename": tag,
                "job_id": run,
                "created_at": 0,
                "width": 1,
                "height": 1,
                "metadata": {"tags": [tag]},
            }
        )
    tagged.upsert(rows)
    query = np.ones(4, dtype=np.float32) / 2
    for i, tag in enumerate(tags):
        by_tag = tagged.search(query, k=50, filters=SearchFilters(tag=tag, job_id=run))
        assert [h["image_id"] for h in by_tag] == [f"{run}-{i}"], repr(tag)
        by_name = tagged.search(query, k=50, filters=SearchFilters(filename=tag, job_id=run))
        assert [h["image_id"] for h in by_name] == [f"{run}-{i}"], repr(tag)
