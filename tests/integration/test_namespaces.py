"""Two deployments on one Redis: neither sees the other's jobs, nor takes its batches."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.stack import Stack
from tests.conftest import running_stack, stack_settings, upload, wait_for_job
from tests.images import encode, make_image

N = 64


@pytest.fixture(scope="module")
def neighbour(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Stack]:
    """A second stack, its own data, Milvus and ports, on the shared stack's Redis."""
    env = stack_settings(
        tmp_path_factory.mktemp("neighbour"), tiny_model, REDIS_URL=stack.settings.redis_url
    )
    with running_stack(env) as second:
        assert "redis" not in second.procs  # it found the first stack's Redis answering
        yield second


def test_two_deployments_share_one_redis_apart(stack: Stack, neighbour: Stack) -> None:
    assert stack.settings.namespace != neighbour.settings.namespace

    def ingest(which: Stack, seed: int) -> tuple[str, list[str]]:
        files = [(f"n{seed}_{i}.jpg", encode(make_image(seed + i))) for i in range(N)]
        with httpx.Client(base_url=which.gateway_url, timeout=120) as api:
            response = upload(api, files)
            assert response.status_code == 202, response.text
            job_id = str(response.json()["job_id"])
            job = wait_for_job(api, job_id, timeout_s=240)
            assert (job["state"], job["done"], job["failed"]) == ("succeeded", N, 0), job
            listed = [j["job_id"] for j in api.get("/v1/jobs").json()["jobs"]]
        return job_id, listed

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(ingest, [stack, neighbour], [600_000, 700_000])
    assert first[0] in first[1] and first[0] not in second[1]
    assert second[0] in second[1] and second[0] not in first[1]
