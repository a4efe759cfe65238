"""The spine: bulk upload → Celery worker → Milvus → text search, against brute force."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor, CLIPModel

from tests.conftest import upload, wait_for_job
from tests.images import write_set

N_IMAGES = 240
QUERIES = [
    "a white dog on a beach",
    "a red car",
    "two cats sleeping",
    "sunset over the sea",
    "a bowl of fruit",
    "x",
]


@pytest.fixture(scope="module")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_set(tmp_path_factory.mktemp("set"), N_IMAGES)


@pytest.fixture(scope="module")
def ingested(api: httpx.Client, image_set: list[Path]) -> dict:
    response = upload(api, [(p.name, p.read_bytes()) for p in image_set])
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["total"] == N_IMAGES and body["rejected"] == []
    return wait_for_job(api, body["job_id"])


def brute_force(
    model_dir: Path, paths: list[Path], texts: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact embeddings from the model's own processor, one file at a time (no shared code)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        images = []
        for path in paths:
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
            images.append(model.get_image_features(pixel_values=pixels).pooler_output[0])
        tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
    img = torch.stack(images)
    img = img / img.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return img.numpy(), text.numpy()


def test_every_image_is_accounted_for(ingested: dict) -> None:
    assert ingested["state"] == "succeeded", ingested
    assert (ingested["done"], ingested["failed"], ingested["duplicates"]) == (N_IMAGES, 0, 0)
    assert ingested["progress"] == 1.0
    assert ingested["started_at"] and ingested["finished_at"]


@pytest.mark.parametrize("k", [10, 25])
def test_search_matches_brute_force_cosine(
    api: httpx.Client, ingested: dict, image_set: list[Path], tiny_model: Path, k: int
) -> None:
    images, texts = brute_force(tiny_model, image_set, QUERIES)
    ids = [__import__("hashlib").sha256(p.read_bytes()).hexdigest() for p in image_set]
    for query, text_vec in zip(QUERIES, texts, strict=True):
        scores = images @ text_vec
        order = np.argsort(-scores)[:k]
        expected = [ids[i] for i in order]
        # Other test modules share this stack's collection: search within this job's images.
        params = {"q": query, "k": k, "job_id": ingested["job_id"]}
        body = api.get("/v1/search", params=params).raise_for_status().json()
        got = [hit["image_id"] for hit in body["hits"]]
        got_scores = [hit["score"] for hit in body["hits"]]
        assert len(got) == k
        assert got_scores == sorted(got_scores, reverse=True)
        # Same top-k in the same order, up to ties: any difference in position must be
        # between images whose exact scores are equal within float tolerance.
        by_id = dict(zip(ids, scores, strict=True))
        for pos, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e or abs(by_id[g] - by_id[e]) < 1e-5, (query, pos, g, e)
        assert np.allclose(got_scores, [by_id[g] for g in got], atol=1e-4)


def test_post_search_and_filters(api: httpx.Client, ingested: dict) -> None:
    job_id = ingested["job_id"]
    get = api.get("/v1/search", params={"q": "a red car", "k": 5}).json()
    post = api.post("/v1/search", json={"text": "a red car", "k": 5}).json()
    assert [h["image_id"] for h in get["hits"]] == [h["image_id"] for h in post["hits"]]
    only_job = api.post(
        "/v1/search", json={"text": "a red car", "k": 5, "filters": {"job_id": job_id}}
    ).json()
    assert only_job["hits"] and all(h["job_id"] == job_id for h in only_job["hits"])
    other = api.post("/v1/search", json={"text": "a red car", "filters": {"job_id": "0" * 32}})
    assert other.status_code == 200 and other.json()["hits"] == []
    top = get["hits"][0]["score"]
    high = api.get("/v1/search", params={"q": "a red car", "min_score": top - 1e-6}).json()
    assert [h["image_id"] for h in high["hits"]] == [get["hits"][0]["image_id"]]


def test_image_search_finds_the_image_itself(
    api: httpx.Client, ingested: dict, image_set: list[Path]
) -> None:
    path = image_set[7]
    body = api.post("/v1/search/image", files={"file": (path.name, path.read_bytes())}).json()
    assert body["hits"][0]["filename"] == path.name
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_images_are_served_with_their_type(
    api: httpx.Client, ingested: dict, image_set: list[Path]
) -> None:
    hit = api.get("/v1/search", params={"q": "anything", "k": 1}).json()["hits"][0]
    response = api.get(hit["image_url"])
    assert response.status_code == 200
    fmt = Image.open(io.BytesIO(response.content)).format
    assert response.headers["content-type"] == Image.MIME[fmt]
    assert any(p.read_bytes() == response.content for p in image_set)
