"""The Milvus store on the real Milvus Lite server: schema, upsert, owners, filters."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

import shared.vectors as vectors_module
from shared.errors import Unavailable
from shared.vectors import SearchFilters, VectorStore, literal


@pytest.fixture
def store(milvus_uri: str) -> VectorStore:
    vs = VectorStore(
        uri=milvus_uri,
        token=None,
        collection=f"t_{uuid.uuid4().hex[:8]}",
        index="HNSW",
    )
    vs.ensure_collection(dim=4)
    return vs


def row(image_id: str, vec: list[float], **extra: object) -> dict:
    v = np.asarray(vec, dtype=np.float32)
    base = {
        "image_id": image_id,
        "vector": (v / np.linalg.norm(v)).tolist(),
        "filename": "f",
        "job_id": "j1",
        "created_at": 0,
        "width": 1,
        "height": 1,
        "metadata": {},
    }
    return {**base, **extra}


def test_upsert_is_keyed_by_image_id(store: VectorStore) -> None:
    store.upsert([row("a", [1, 0, 0, 0]), row("b", [0, 1, 0, 0])])
    store.upsert([row("a", [1, 0, 0, 0], job_id="j2")])
    assert store.count() == 2
    assert store.owners(["a", "b", "zzz"]) == {"a": "j2", "b": "j1"}


def test_search_orders_by_cosine(store: VectorStore) -> None:
    store.upsert([row("a", [1, 0, 0, 0]), row("b", [1, 1, 0, 0]), row("c", [0, 0, 1, 0])])
    hits = store.search(np.array([1, 0, 0, 0], dtype=np.float32), k=3)
    assert [h["image_id"] for h in hits] == ["a", "b", "c"]
    assert [round(h["score"], 4) for h in hits] == [1.0, 0.7071, 0.0]


def test_filters_are_escaped_not_injected(store: VectorStore) -> None:
    store.upsert(
        [
            row("a", [1, 0, 0, 0], metadata={"tags": ['it"s']}),
            row("b", [0, 1, 0, 0], job_id='x" or job_id != "'),
        ]
    )
    q = np.array([1, 1, 0, 0], dtype=np.float32)
    evil = SearchFilters(job_id='x" or job_id != "')
    assert [h["image_id"] for h in store.search(q, k=5, filters=evil)] == ["b"]
    assert [h["image_id"] for h in store.search(q, k=5, filters=SearchFilters(tag='it"s'))] == ["a"]
    assert store.search(q, k=5, filters=SearchFilters(tag="it")) == []


def test_literal_escapes_only_what_the_lexer_knows() -> None:
    assert literal('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert literal("ünï'") == '"ünï\'"'


def test_dimension_mismatch_is_a_clear_error(store: VectorStore) -> None:
    other = VectorStore(uri=store.uri, token=None, collection=store.collection)
    with pytest.raises(Unavailable) as err:
        other.ensure_collection(dim=8)
    assert err.value.code == "dimension_mismatch"


def test_unreachable_milvus_is_unavailable() -> None:
    dead = VectorStore(uri="http://127.0.0.1:1", token=None, collection="x")
    with pytest.raises(Unavailable) as err:
        dead.ping()
    assert err.value.code == "milvus_unavailable"


@pytest.mark.slow  # 3,000 rows
def test_selective_filters_are_answered_exactly(
    milvus_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 images of one job among 3,000: HNSW under such a filter found only some of them.
    vs = VectorStore(
        uri=milvus_uri,
        token=None,
        collection=f"t_{uuid.uuid4().hex[:8]}",
        index="HNSW",
    )
    vs.ensure_collection(dim=32)
    rng = np.random.default_rng(3)
    base = rng.normal(size=32)  # near-identical vectors, as an untrained model makes them
    big = base + 0.05 * rng.normal(size=(3000, 32))
    for lo in range(0, 3000, 1000):
        vs.upsert(
            [row(f"b{lo + i}", list(v), job_id="big") for i, v in enumerate(big[lo : lo + 1000])]
        )
    small = base + 0.05 * rng.normal(size=(8, 32))
    vs.upsert([row(f"s{i}", list(v), job_id="small") for i, v in enumerate(small)])
    vs.settle()
    for lo in range(0, 3000, 1000):  # written again (a redelivered batch): stale copies too
        vs.upsert(
            [row(f"b{lo + i}", list(v), job_id="big") for i, v in enumerate(big[lo : lo + 1000])]
        )
    q = (base + 0.05 * rng.normal(size=32)).astype(np.float32)
    cos = small @ q / (np.linalg.norm(small, axis=1) * np.linalg.norm(q))
    expected = [f"s{i}" for i in np.argsort(-cos)]
    hits = vs.search(q, k=100, filters=SearchFilters(job_id="small"))
    assert [h["image_id"] for h in hits] == expected
    assert np.allclose([h["score"] for h in hits], np.sort(cos)[::-1], atol=1e-5)
    assert all(h["job_id"] == "small" and h["filename"] == "f" for h in hits)
    # Past the limit the index answers: still only the job's images, best first.
    monkeypatch.setattr(vectors_module, "EXACT_FILTERED_ROWS", 4)
    ann = vs.search(q, k=100, filters=SearchFilters(job_id="small"))
    assert {h["image_id"] for h in ann} <= set(expected)
    assert [h["score"] for h in ann] == sorted((h["score"] for h in ann), reverse=True)


@pytest.fixture
def lite_store(milvus_uri: str) -> VectorStore:
    """A fresh collection on a private Milvus Lite server (no whole stack needed)."""
    vs = VectorStore(
        uri=milvus_uri, token=None, collection=f"t_{uuid.uuid4().hex[:8]}", index="FLAT"
    )
    vs.ensure_collection(dim=4)
    return vs


@pytest.mark.parametrize(
    "name",
    [
        "a" * 1100,
        "archive/" + "é" * 600 + "/photo.jpg",  # 614 characters, 1,214 bytes
        "相册/" + "写真" * 200 + "/猫.jpg",  # 3-byte characters
        "emoji/" + "🐈" * 300 + ".png",  # 4-byte characters
    ],
)
def test_fit_utf8_cuts_at_a_character_boundary(name: str) -> None:
    fitted = vectors_module.fit_utf8(name, vectors_module.FILENAME_MAX_BYTES)
    data = fitted.encode("utf-8")  # strict: only whole characters
    assert len(data) <= vectors_module.FILENAME_MAX_BYTES
    assert len(data) > vectors_module.FILENAME_MAX_BYTES - 4  # as much as fits
    assert fitted.startswith(vectors_module.ELLIPSIS)
    assert name.endswith(fitted[1:])  # the end of the path, the file's own name, is kept


def test_fit_utf8_leaves_names_that_fit() -> None:
    for name in ("photo.jpg", "é" * 512, "x" * 1024, ""):
        assert vectors_module.fit_utf8(name, 1024) == name


def test_long_filenames_never_fail_their_batch(lite_store: VectorStore) -> None:
    """A long archive path used to fail the whole upsert: every row of the batch was lost."""
    long_ascii = "deep/" * 220 + "photo.jpg"
    long_utf8 = "archive/" + "é" * 600 + "/photo.jpg"
    lite_store.upsert(
        [
            row("a", [1, 0, 0, 0], filename=long_ascii),
            row("b", [0, 1, 0, 0], filename=long_utf8),
            row("c", [0, 0, 1, 0], filename="short.jpg"),
        ]
    )
    assert lite_store.count() == 3
    got = lite_store.client.get(
        lite_store.collection,
        ids=["a", "b", "c"],
        output_fields=["filename"],
        consistency_level="Strong",
    )
    names = {r["image_id"]: r["filename"] for r in got}
    assert names["c"] == "short.jpg"
    for key in ("a", "b"):
        assert len(names[key].encode()) <= vectors_module.FILENAME_MAX_BYTES
        assert names[key].endswith("/photo.jpg")
