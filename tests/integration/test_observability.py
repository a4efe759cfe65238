"""Metrics on the gateway, query service and workers; JSON logs that carry the job id."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.stack import Stack
from tests.conftest import free_port, running_stack, stack_settings, upload, wait_for_job
from tests.images import encode, make_image

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """A private stack whose worker serves its metrics on a known port."""
    port = free_port()
    env = stack_settings(tmp_path_factory.mktemp("observed"), tiny_model)
    env["WORKER_METRICS_PORT"] = str(port)
    with running_stack(env) as stack:
        stack.env["WORKER_METRICS_URL"] = f"http://127.0.0.1:{port}/metrics"
        yield stack


def scrape(url: str) -> Series:
    deadline = time.monotonic() + 30
    while True:
        try:
            text = httpx.get(url, timeout=10).raise_for_status().text
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def eventually(check: Callable[[], None], timeout_s: float = 15) -> None:
    """Counters move just after a job's state does: poll briefly."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def log_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_metrics_endpoints_count_uploads_searches_and_batches(observed: Stack) -> None:
    urls = {
        "gateway": f"{observed.gateway_url}/metrics",
        "query": f"{observed.query_url}/metrics",
        "worker": observed.env["WORKER_METRICS_URL"],
    }
    before = {name: scrape(url) for name, url in urls.items()}
    whole = encode(make_image(22002, size=(400, 300)))
    files = [
        ("a.jpg", encode(make_image(22000))),
        ("b.png", encode(make_image(22001), "PNG")),
        ("c.jpg", encode(make_image(22003))),
        ("cut.jpg", whole[: len(whole) // 2]),  # passes the door, fails to decode
        ("notes.jpg", b"only text"),  # refused at the door
    ]
    with httpx.Client(base_url=observed.gateway_url, timeout=60) as api:
        body = upload(api, files).raise_for_status().json()
        job = wait_for_job(api, body["job_id"])
        assert (job["done"], job["failed"]) == (3, 2)
        assert api.get("/v1/search", params={"q": "a cat"}).status_code == 200
        assert api.post("/v1/search", json={"text": "a dog"}).status_code == 200

    def moved(name: str, metric: str, **labels: str) -> float:
        return value(scrape(urls[name]), metric, **labels) - value(before[name], metric, **labels)

    assert moved("gateway", "clipsearch_jobs_created_total") == 1
    assert moved("gateway", "clipsearch_images_accepted_total") == 4
    assert moved("gateway", "clipsearch_images_rejected_total", code="not_an_image") == 1
    posts = {"handler": "/v1/jobs", "method": "POST", "status": "202"}
    assert moved("gateway", "http_requests_total", **posts) == 1
    get_search = {"handler": "/v1/search", "method": "GET", "status": "200"}
    assert moved("gateway", "http_request_duration_seconds_count", **get_search) == 1
    assert moved("query", "clipsearch_search_seconds_count", kind="text") == 2
    assert moved("query", "clipsearch_search_stage_seconds_count", stage="encode") == 2
    assert moved("query", "clipsearch_search_stage_seconds_count", stage="search") == 2
    assert moved("query", "http_requests_total", **get_search) == 1

    def worker_counted() -> None:
        assert moved("worker", "clipsearch_worker_images_total", outcome="done") == 3
        assert moved("worker", "clipsearch_worker_images_total", outcome="failed") == 1
        assert moved("worker", "clipsearch_worker_errors_total", code="decode_failed") == 1
        assert moved("worker", "clipsearch_worker_batches_total", state="SUCCESS") >= 1
        assert moved("worker", "clipsearch_worker_batch_images_sum") == 4
        assert moved("worker", "clipsearch_worker_stage_seconds_count", stage="encode") >= 1

    eventually(worker_counted)


def test_logs_are_json_lines_with_the_job_id(observed: Stack) -> None:
    with httpx.Client(base_url=observed.gateway_url, timeout=60) as api:
        body = upload(api, [("log.jpg", encode(make_image(22010)))]).raise_for_status().json()
        job_id = body["job_id"]
        wait_for_job(api, job_id)
        api.get("/v1/search", params={"q": "logged"}).raise_for_status()

    def batch_logged() -> None:
        worker = log_lines(observed.log_dir / "worker1.log")
        assert all(x["service"] == "worker" for x in worker)
        batch = [x for x in worker if x["logger"] == "services.worker.pipeline"]
        mine = [x for x in batch if x.get("job_id") == job_id]
        assert mine and {"encode", "record"} <= set(mine[-1]["stages"]), batch[-3:]
        # Celery's own lines about the task carry the job id too, without its arguments.
        traced = [x for x in worker if x["logger"] == "celery.app.trace"]
        assert any(x.get("job_id") == job_id for x in traced)
        assert all("kwargs" not in x.get("data", {}) for x in traced)

    eventually(batch_logged)
    gateway = log_lines(observed.log_dir / "gateway.log")
    created = [x for x in gateway if x.get("job_id") == job_id]
    assert created and created[0]["service"] == "gateway" and created[0]["level"] == "INFO"
    access = [x for x in gateway if x["logger"] == "uvicorn.access"]
    assert any(
        x["method"] == "POST" and x["path"] == "/v1/jobs" and x["status"] == 202 for x in access
    )
    query = [
        x for x in log_lines(observed.log_dir / "query.log") if x["logger"] == "uvicorn.access"
    ]
    assert any(x["path"].startswith("/v1/search?q=logged") and x["status"] == 200 for x in query)
    assert all(x["service"] == "query" and "time" in x for x in query)
