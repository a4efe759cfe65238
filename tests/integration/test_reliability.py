"""Nothing accepted is lost: workers killed, Milvus and Redis restarted, mid-job."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from services.stack import Stack
from shared.tasks import queue_key
from shared.vectors import SearchFilters, VectorStore
from tests.conftest import running_stack, stack_settings, upload, wait_for_job
from tests.images import encode, make_image

N = 240
POISON_HOOK = Path(__file__).parents[1] / "support" / "poison"


@pytest.fixture(scope="module")
def rstack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """A stack of its own with two workers, small batches and a short visibility timeout."""
    env = stack_settings(
        tmp_path_factory.mktemp("rdata"),
        tiny_model,
        EMBED_BATCH_SIZE="4",
        TASK_VISIBILITY_TIMEOUT_S="8",
        JOB_STALL_TIMEOUT_S="6",
        BATCH_MAX_ATTEMPTS="2",
        PYTHONPATH=os.pathsep.join([str(POISON_HOOK), os.environ.get("PYTHONPATH", "")]),
    )
    with running_stack(env, workers=2) as stack:
        yield stack


@pytest.fixture(scope="module")
def rapi(rstack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rstack.gateway_url, timeout=120) as client:
        yield client


def start_job(api: httpx.Client, seed: int, n: int = N) -> str:
    files = [(f"r{seed}_{i}.jpg", encode(make_image(seed * 10_000 + i))) for i in range(n)]
    response = upload(api, files)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def wait_until_done_at_least(api: httpx.Client, job_id: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if api.get(f"/v1/jobs/{job_id}").json()["done"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} made no progress")


def assert_indexed_exactly_once(
    stack: Stack, api: httpx.Client, job_id: str, n: int = N, timeout_s: float = 240
) -> None:
    job = wait_for_job(api, job_id, timeout_s=timeout_s)
    assert (job["state"], job["done"], job["failed"], job["duplicates"]) == ("succeeded", n, 0, 0)
    indexed_rows(stack, job_id, n)


def indexed_rows(stack: Stack, job_id: str, n: int) -> None:
    """The job's rows in Milvus: exactly `n`, each image once."""
    store = VectorStore(
        uri=stack.settings.milvus_uri, token=None, collection=stack.settings.milvus_collection
    )
    rows = store.client.query(
        store.collection,
        filter=SearchFilters(job_id=job_id).expression(),
        output_fields=["image_id"],
        consistency_level="Strong",
        limit=10_000,
    )
    assert len(rows) == n and len({r["image_id"] for r in rows}) == n


def pool_children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_worker_killed_with_sigkill(rstack: Stack, rapi: httpx.Client) -> None:
    job_id = start_job(rapi, 1)
    wait_until_done_at_least(rapi, job_id, 20)
    rstack.stop("worker1", sig=signal.SIGKILL)  # the whole worker, pool child included
    rstack.start_worker("worker1")
    assert_indexed_exactly_once(rstack, rapi, job_id)


def test_pool_child_killed(rstack: Stack, rapi: httpx.Client) -> None:
    job_id = start_job(rapi, 2)
    wait_until_done_at_least(rapi, job_id, 20)
    for name in ("worker1", "worker2"):
        for child in pool_children(rstack.procs[name].pid):
            os.kill(child, signal.SIGKILL)
    assert_indexed_exactly_once(rstack, rapi, job_id)


def test_warm_shutdown_with_sigterm(rstack: Stack, rapi: httpx.Client) -> None:
    job_id = start_job(rapi, 3)
    wait_until_done_at_least(rapi, job_id, 20)
    rstack.send("worker2", signal.SIGTERM, group=False)  # Celery's warm shutdown
    assert rstack.procs["worker2"].wait(timeout=60) == 0
    assert_indexed_exactly_once(rstack, rapi, job_id)
    rstack.start_worker("worker2")


def test_milvus_outage_mid_job(rstack: Stack, rapi: httpx.Client) -> None:
    job_id = start_job(rapi, 4)
    wait_until_done_at_least(rapi, job_id, 12)
    rstack.stop("milvus")
    try:
        ready = rapi.get("/readyz")
        assert (ready.status_code, ready.json()["code"]) == (503, "not_ready")
        assert ready.json()["checks"]["milvus"].startswith("error")
        start = time.monotonic()
        search = rapi.get("/v1/search", params={"q": "anything"})
        assert (search.status_code, search.json()["code"]) == (503, "milvus_unavailable")
        assert time.monotonic() - start < 15
        time.sleep(8)
    finally:
        rstack.restart("milvus")
    assert_indexed_exactly_once(rstack, rapi, job_id)
    assert rapi.get("/readyz").status_code == 200
    assert rapi.get("/v1/search", params={"q": "anything"}).status_code == 200


def test_redis_restart_mid_job(rstack: Stack, rapi: httpx.Client) -> None:
    if "redis" not in rstack.procs:
        pytest.skip("this stack reuses a Redis it did not start")
    job_id = start_job(rapi, 5)
    wait_until_done_at_least(rapi, job_id, 12)
    rstack.stop("redis")
    time.sleep(2)
    rstack.restart("redis")
    assert_indexed_exactly_once(rstack, rapi, job_id)


def test_batches_lost_by_the_broker_are_sent_again(rstack: Stack, rapi: httpx.Client) -> None:
    """Messages gone from the queue (a broker outage) are found and sent again in bounded time."""
    workers = [name for name in rstack.procs if name.startswith("worker")]
    for name in workers:
        rstack.send(name, signal.SIGSTOP)
    try:
        job_id = start_job(rapi, 6, n=40)
        r = redis.Redis.from_url(rstack.settings.redis_url)
        queue = queue_key(rstack.settings)
        assert r.llen(queue) >= 3
        assert r.lpop(queue) and r.rpop(queue)  # the newest message and the oldest one
    finally:
        for name in workers:
            rstack.send(name, signal.SIGCONT)
    # Stall timeout 6 s, sweeps every 1.5 s: well within the wait.
    assert_indexed_exactly_once(rstack, rapi, job_id, n=40, timeout_s=60)


def test_an_image_that_kills_its_worker_fails_alone(rstack: Stack, rapi: httpx.Client) -> None:
    poison = encode(make_image(70_000), comment=b"CLIPSEARCH-TEST-POISON")
    files = [(f"p{i}.jpg", encode(make_image(70_001 + i))) for i in range(7)]
    files.insert(5, ("poison.jpg", poison))
    response = upload(rapi, files)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    job = wait_for_job(rapi, job_id, timeout_s=180)
    assert (job["state"], job["done"], job["failed"]) == ("completed_with_errors", 7, 1)
    assert [(e["filename"], e["code"]) for e in job["errors"]] == [("poison.jpg", "worker_crashed")]
    indexed_rows(rstack, job_id, 7)
