"""The sweeper on a real Redis and broker: lost batches are sent again, then failed; nothing
still waiting in the queue is touched."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from services.worker.sweeper import Sweeper
from shared.jobs import ItemResult, JobStore
from shared.settings import Settings
from shared.tasks import make_celery, queue_key

STALL = 30.0


@pytest.fixture
def settings(redis_url: str) -> Settings:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    return Settings(redis_url=redis_url).model_copy(update={"namespace_override": namespace})


@pytest.fixture
def app(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def jobs(settings: Settings) -> JobStore:
    return JobStore.from_settings(settings)


def sweeper(jobs: JobStore, app: Celery, settings: Settings, max_requeues: int = 2) -> Sweeper:
    return Sweeper(
        jobs=jobs,
        app=app,
        queue_key=queue_key(settings),
        stall_s=STALL,
        max_requeues=max_requeues,
    )


def items(*keys: str) -> list[dict[str, str]]:
    return [{"key": k, "image_id": k * 8, "filename": f"{k}.jpg"} for k in keys]


def waiting(jobs: JobStore, settings: Settings) -> list[dict[str, Any]]:
    """The kwargs of the messages in the queue, oldest first."""
    raw = jobs.r.lrange(queue_key(settings), 0, -1)
    bodies = [base64.b64decode(json.loads(m)["body"]) for m in reversed(raw)]
    return [json.loads(body)[1] for body in bodies]  # Celery's (args, kwargs, embed)


def test_a_lost_batch_is_sent_again_then_failed(
    jobs: JobStore, app: Celery, settings: Settings
) -> None:
    job_id = jobs.create(total=3, metadata={"tag": "x"})
    jobs.add_batch(job_id, items("a", "b"))  # recorded, but its message was lost
    n, seq = jobs.add_batch(job_id, items("c"))
    jobs.start(job_id, batch=str(n), seq=seq)
    jobs.record(job_id, [ItemResult("c", "done")], batch=str(n))
    sweep = sweeper(jobs, app, settings)
    now = time.time()
    assert sweep.sweep(now).requeued == {}  # not stalled yet
    assert sweep.sweep(now + STALL + 1).requeued == {job_id: 2}
    sent = waiting(jobs, settings)
    assert len(sent) == 1
    assert [it["key"] for it in sent[0]["items"]] == ["a", "b"]
    assert sent[0]["metadata"] == {"tag": "x"}
    # Its new message waits in the queue: left alone however long it waits.
    assert sweep.sweep(now + 10 * STALL).requeued == {}
    jobs.r.delete(queue_key(settings))  # lost again, twice
    assert sweep.sweep(now + 20 * STALL).requeued == {job_id: 2}
    jobs.r.delete(queue_key(settings))
    result = sweep.sweep(now + 30 * STALL)
    assert (result.requeued, result.lost) == ({}, {job_id: 2})
    job = jobs.get(job_id)
    assert (job["state"], job["done"], job["failed"]) == ("completed_with_errors", 1, 2)
    assert {e["code"] for e in job["errors"]} == {"batch_lost"}
    assert jobs.active() == []


def test_messages_still_in_the_queue_are_left_alone(
    jobs: JobStore, app: Celery, settings: Settings
) -> None:
    job_id = jobs.create(total=1)
    jobs.add_batch(job_id, items("a"))
    jobs.r.lpush(queue_key(settings), "a message not taken yet")
    assert sweeper(jobs, app, settings).sweep(time.time() + 100 * STALL).requeued == {}
    jobs.start("no-such-job", seq=10**9)  # a later message was taken: ours was lost
    assert sweeper(jobs, app, settings).sweep(time.time() + 100 * STALL).requeued == {job_id: 1}


def test_a_job_whose_upload_stopped_part_way_is_cancelled(
    jobs: JobStore, app: Celery, settings: Settings
) -> None:
    job_id = jobs.create(total=5)
    n, _ = jobs.add_batch(job_id, items("a"))
    jobs.record(job_id, [ItemResult("a", "done")], batch=str(n))
    result = sweeper(jobs, app, settings).sweep(time.time() + STALL + 1)
    assert result.interrupted == [job_id]
    job = jobs.get(job_id)
    assert (job["state"], job["reason"]) == ("cancelled", "upload_interrupted")
