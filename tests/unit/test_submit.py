"""Submitting a job: batches go out while the upload is still being stored, and a request
that fails part way leaves a job that says so (or, for archives, no job at all)."""

from __future__ import annotations

import io
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Any, cast

import pytest
from celery import Celery
from kombu.exceptions import OperationalError

from services.gateway.ingest import Limits
from services.gateway.submit import submit_job
from shared.blobs import BlobStore
from shared.errors import PayloadTooLarge, Unavailable
from shared.jobs import JobStore
from tests.images import encode, make_image

LIMITS = Limits(
    max_file_bytes=1_000_000,
    max_image_pixels=4_000_000,
    max_archive_entries=100,
    max_archive_bytes=30_000_000,
)


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, Any]] = []

    def add(self, kind: str, what: Any) -> None:
        with self.lock:
            self.log.append((kind, what))


class RecordingBlobs(BlobStore):
    """Real local blobs that note when each put finished, failing from `fail_at` on."""

    def __init__(self, root: Path, events: Events, fail_at: int | None = None) -> None:
        super().__init__(root)
        self.events, self.fail_at, self.count = events, fail_at, 0

    def put(self, data: bytes) -> str:
        with self.events.lock:
            self.count += 1
            mine = self.count
        if self.fail_at is not None and mine >= self.fail_at:
            raise OSError("disk full")
        key = super().put(data)
        self.events.add("put", key)
        return key


class RecordingBroker:
    """Stands in for the Celery app's send_task: the batches it would publish, in order."""

    def __init__(self, events: Events, jobs: JobStore) -> None:
        self.events, self.jobs = events, jobs

    def send_task(self, name: str, *, kwargs: dict[str, Any], queue: str) -> None:
        # The worker looks the job up first: it must exist when a batch is published.
        assert self.jobs.state(kwargs["job_id"]) == "queued"
        self.events.add("send", [it["key"] for it in kwargs["items"]])


@pytest.fixture
def jobs(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, namespace=f"t{uuid.uuid4().hex[:8]}")


def images(n: int, offset: int = 0) -> list[tuple[str, bytes]]:
    return [(f"im{i}.png", encode(make_image(offset + i, size=(40, 30)), "PNG")) for i in range(n)]


def submit(tmp_path: Path, jobs: JobStore, uploads: list[tuple[str, bytes]], **kw: Any) -> Any:
    events = Events()
    blobs = RecordingBlobs(tmp_path / "blobs", events, fail_at=kw.pop("fail_at", None))
    broker = RecordingBroker(events, jobs)
    options: dict[str, Any] = {"max_items": 1000, "batch_size": 4, **kw}
    sub = submit_job(
        uploads=uploads,
        metadata={},
        limits=LIMITS,
        blobs=blobs,
        jobs=jobs,
        celery=cast(Celery, broker),
        **options,
    )
    return sub, events


def test_batches_go_out_while_the_rest_is_still_being_stored(
    tmp_path: Path, jobs: JobStore
) -> None:
    uploads = [*images(60), ("bad.png", b"not an image"), *images(1)]  # a duplicate at the end
    sub, events = submit(tmp_path, jobs, uploads)
    assert sub.total == 62 and [r.code for r in sub.rejected] == ["not_an_image"]
    kinds = [kind for kind, _ in events.log]
    assert kinds.index("send") < len(kinds) - 1 - kinds[::-1].index("put")  # interleaved
    sent = [key for kind, keys in events.log if kind == "send" for key in keys]
    assert sent == [f"i{n}" for n in range(1, 61)]  # every image once, in order, batches of 4
    assert all(len(keys) == 4 for kind, keys in events.log if kind == "send")
    record = jobs.get(sub.job_id)
    assert (record["total"], record["failed"], record["duplicates"]) == (62, 1, 1)
    assert record["state"] == "queued"  # the 60 embeds are the workers' to count


def test_a_failure_part_way_cancels_the_job_it_started(tmp_path: Path, jobs: JobStore) -> None:
    with pytest.raises(Unavailable) as err:
        submit(tmp_path, jobs, images(40, offset=100), fail_at=30)
    assert err.value.code == "storage_unavailable"
    newest = jobs.recent(limit=1)[0]
    assert newest["state"] == "cancelled" and newest["total"] == 40


def test_archives_are_checked_whole_before_any_job_exists(tmp_path: Path, jobs: JobStore) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in images(12, offset=200):
            zf.writestr(name, data)
    before = {j["job_id"] for j in jobs.recent(limit=500)}
    with pytest.raises(PayloadTooLarge):
        submit(tmp_path, jobs, [("set.zip", buf.getvalue())], max_items=10)
    assert {j["job_id"] for j in jobs.recent(limit=500)} == before
    sub, events = submit(tmp_path, jobs, [("set.zip", buf.getvalue())])
    kinds = [kind for kind, _ in events.log]
    assert kinds.count("send") == 3 and "put" not in kinds[kinds.index("send") :]
    assert jobs.get(sub.job_id)["total"] == 12


class FailingBroker(RecordingBroker):
    """A broker that accepts `accept` batches, then is unreachable."""

    def __init__(self, events: Events, jobs: JobStore, accept: int) -> None:
        super().__init__(events, jobs)
        self.accept = accept

    def send_task(self, name: str, *, kwargs: dict[str, Any], queue: str) -> None:
        if self.accept <= 0:
            raise OperationalError("Error 111 connecting to the broker")
        self.accept -= 1
        super().send_task(name, kwargs=kwargs, queue=queue)


def test_an_archive_job_whose_enqueue_fails_is_cancelled_with_its_reason(
    tmp_path: Path, jobs: JobStore
) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in images(10, offset=300):
            zf.writestr(name, data)
    events = Events()
    with pytest.raises(Unavailable) as err:
        submit_job(
            uploads=[("set.zip", buf.getvalue())],
            metadata={},
            limits=LIMITS,
            max_items=1000,
            batch_size=4,
            blobs=RecordingBlobs(tmp_path / "blobs", events),
            jobs=jobs,
            celery=cast(Celery, FailingBroker(events, jobs, accept=1)),
        )
    assert err.value.code == "queue_unavailable"
    record = jobs.recent(limit=1)[0]
    job = jobs.get(record["job_id"])
    assert job["state"] == "cancelled" and job["total"] == 10
    assert [e["code"] for e in job["errors"]] == ["queue_unavailable"] * 6  # 4 went out
    assert job["errors"][0]["filename"] == "set.zip/im4.png"
