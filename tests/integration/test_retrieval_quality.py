"""Retrieval quality through the whole stack equals the trained model's own (Fashion-MNIST).

Trains the demo's small CLIP once (cached under data/test-cache; a few minutes on 2 cores)
on Debian's dataset-fashion-mnist, indexes 100 test images per class through the gateway
and compares each class prompt's precision@10 with the model's, computed directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.demo.evaluate import precision_at_k
from services.demo.fashion import CLASS_PROMPTS, CLASS_SLUGS, label_of, write_images
from services.demo.train import ensure_demo_model
from shared.ml.encoder import ClipEncoder
from tests.conftest import running_stack, stack_settings, upload, wait_for_job

CACHE = Path(__file__).resolve().parents[2] / "data" / "test-cache"
PER_CLASS = 100


@pytest.fixture(scope="module")
def trained() -> Path:
    return ensure_demo_model(CACHE / "fashion-clip", cache_dir=CACHE)


@pytest.fixture(scope="module")
def fashion_images() -> list[Path]:
    return write_images(CACHE / "fashion-test", cache_dir=CACHE, per_class=PER_CLASS)


@pytest.fixture(scope="module")
def fashion_api(
    tmp_path_factory: pytest.TempPathFactory, trained: Path, fashion_images: list[Path]
) -> Iterator[httpx.Client]:
    env = stack_settings(tmp_path_factory.mktemp("fashion"), trained, EMBED_BATCH_SIZE="64")
    with (
        running_stack(env) as stack,
        httpx.Client(base_url=stack.gateway_url, timeout=120) as client,
    ):
        files = [(f"{p.parent.name}/{p.name}", p.read_bytes()) for p in fashion_images]
        job = wait_for_job(client, upload(client, files).json()["job_id"], timeout_s=600)
        assert (job["state"], job["done"]) == ("succeeded", len(fashion_images))
        yield client


def test_stack_precision_matches_the_model(
    fashion_api: httpx.Client, trained: Path, fashion_images: list[Path]
) -> None:
    encoder = ClipEncoder(model=str(trained), device="cpu", dtype="float32")
    direct = precision_at_k(encoder, fashion_images, [label_of(p) for p in fashion_images])
    assert sum(direct.values()) / len(direct) >= 0.7, direct  # the model learned something
    for name, prompt in CLASS_PROMPTS.items():
        hits = fashion_api.get("/v1/search", params={"q": prompt, "k": 10}).json()["hits"]
        got = sum(h["filename"].split("/")[0] == CLASS_SLUGS[name] for h in hits) / 10
        assert got >= direct[name] - 0.05, (prompt, got, direct[name])
