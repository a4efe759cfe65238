"""Turn validated uploads into a job: store blobs, record the job, enqueue batches."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from services.gateway.archives import Budget
from services.gateway.ingest import (
    Candidate,
    Limits,
    Rejection,
    clean_filename,
    expand,
    is_archive,
)
from shared.blobs import BlobStore
from shared.errors import (
    ClipsearchError,
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)
from shared.jobs import ItemResult, JobStore
from shared.tasks import BatchItem, enqueue_batch


@dataclass
class Submission:
    """What one POST /v1/jobs produced."""

    job_id: str
    total: int
    rejected: list[Rejection] = field(default_factory=list)
    replayed: bool = False  # an earlier request with the same Idempotency-Key made it


_PUT_THREADS = 8
# Images read but not yet stored, at most (plus one file): what a request holds in memory.
_WINDOW_BYTES = 64 * 1024 * 1024
_PUTS = ThreadPoolExecutor(_PUT_THREADS, thread_name_prefix="blob-put")

# Printable ASCII without spaces, as the IETF draft and Stripe's keys are; UUIDs fit.
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


class RequestInProgress(Conflict):
    """The Idempotency-Key names a request that has not finished yet: retry shortly."""

    code = "idempotency_key_in_progress"
    headers = {"Retry-After": "1"}


def submit_job(
    *,
    uploads: Iterable[tuple[str, bytes | BinaryIO]],
    metadata: dict[str, Any],
    limits: Limits,
    max_items: int,
    batch_size: int,
    blobs: BlobStore,
    jobs: JobStore,
    celery: Celery,
    idempotency_key: str | None = None,
    idempotency_scope: str = "",
) -> Submission:
    """Validate and store every image, record one job, enqueue its batches; embed nothing.

    With an `idempotency_key`, a repeat (in the same scope: the same API key) returns the
    first request's job; a request that fails releases the key so that it can be retried.
    """
    job_id = uuid.uuid4().hex
    if idempotency_key is not None:
        if not IDEMPOTENCY_KEY.match(idempotency_key):
            raise InvalidInput(
                "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
                code="invalid_idempotency_key",
            )
        if idempotency_scope:
            idempotency_key = f"{idempotency_scope}:{idempotency_key}"
        earlier = _claim(jobs, idempotency_key, job_id)
        if earlier != job_id:
            return _replay(jobs, earlier)
    try:
        return _submit(
            job_id=job_id,
            uploads=uploads,
            metadata=metadata,
            limits=limits,
            max_items=max_items,
            batch_size=batch_size,
            blobs=blobs,
            jobs=jobs,
            celery=celery,
        )
    except BaseException:
        if idempotency_key:
            _release(jobs, idempotency_key, job_id)
        raise


def _submit(
    *,
    job_id: str,
    uploads: Iterable[tuple[str, bytes | BinaryIO]],
    metadata: dict[str, Any],
    limits: Limits,
    max_items: int,
    batch_size: int,
    blobs: BlobStore,
    jobs: JobStore,
    celery: Celery,
) -> Submission:
    uploads = list(uploads)
    # Without archives the job's size is known before anything is read: the job is recorded
    # first and each batch is enqueued as soon as its images are stored, so the workers start
    # while the rest of the upload is still being stored. Archives are expanded and checked
    # whole first (an archive over the limits must leave no job behind).
    streaming = not any(is_archive(clean_filename(name), data) for name, data in uploads)
    if streaming:
        if len(uploads) > max_items:
            raise PayloadTooLarge(f"a job holds at most {max_items} images", code="too_many_files")
        _queue_errors(lambda: jobs.create(total=len(uploads), job_id=job_id, metadata=metadata))
    created = streaming
    budget = Budget(
        max_entries=limits.max_archive_entries,
        max_bytes=limits.max_archive_bytes,
        max_cpu_s=limits.max_expand_cpu_s,
    )
    held = 0  # bytes of images in the window
    items: list[BatchItem] = []
    counted: list[ItemResult] = []  # rejected and in-job duplicates, counted at once
    rejected: list[Rejection] = []
    seen: set[str] = set()
    sent = 0  # items already enqueued
    n = 0

    def send(upto: int) -> None:
        nonlocal sent
        for start in range(sent, upto, batch_size):
            batch = items[start : min(start + batch_size, upto)]
            try:
                enqueue_batch(celery, jobs, job_id=job_id, items=batch, metadata=metadata)
            except (redis.RedisError, OperationalError) as exc:
                raise Unavailable(
                    f"the job queue is unavailable: {exc}", code="queue_unavailable"
                ) from exc
            sent = start + len(batch)  # what a failure leaves unsent is items[sent:]
        sent = upto

    # Blobs are written by a few threads (each put ends with an fsync), in upload order.
    window: deque[tuple[str, Candidate, Future[str]]] = deque()

    def settle(keep: int) -> None:
        nonlocal held
        while len(window) > keep or held > _WINDOW_BYTES:
            key, found, stored = window.popleft()
            held -= len(found.data)
            image_id = stored.result()
            if image_id in seen:
                counted.append(ItemResult(key, "duplicates", found.filename))
                continue
            seen.add(image_id)
            items.append({"key": key, "image_id": image_id, "filename": found.filename})
            if streaming and len(items) - sent >= batch_size:
                send(sent + batch_size)

    try:
        for raw_name, data in uploads:
            for found in expand(clean_filename(raw_name), data, limits, budget):
                n += 1
                if n > max_items:
                    raise PayloadTooLarge(
                        f"a job holds at most {max_items} images", code="too_many_files"
                    )
                key = f"i{n}"
                if isinstance(found, Rejection):
                    rejected.append(found)
                    counted.append(
                        ItemResult(key, "failed", found.filename, found.code, found.detail)
                    )
                    continue
                window.append((key, found, _PUTS.submit(_store, blobs, found)))
                held += len(found.data)
                settle(keep=_PUT_THREADS * 2)
        settle(keep=0)
        if streaming:
            send(len(items))
            _queue_errors(lambda: jobs.record(job_id, counted))
        else:
            _queue_errors(
                lambda: jobs.create(total=n, rejected=counted, job_id=job_id, metadata=metadata)
            )
            created = True
            send(len(items))
    except BaseException as exc:
        for _, _, stored in window:
            stored.cancel()
        if created:  # batches may be out already: they will be skipped, the job says why
            _abandon(jobs, job_id, items[sent:], exc)
        raise
    return Submission(job_id, n, rejected)


def _abandon(jobs: JobStore, job_id: str, unsent: list[BatchItem], exc: BaseException) -> None:
    """Cancel a job this request could not finish; its items never enqueued say why."""
    code, detail = "internal_error", "the request failed before this image was queued"
    if isinstance(exc, ClipsearchError):
        code, detail = exc.code, exc.detail
    with contextlib.suppress(Exception):  # the job store may be what failed
        jobs.cancel(job_id, reason=code)
        jobs.record(
            job_id, [ItemResult(it["key"], "failed", it["filename"], code, detail) for it in unsent]
        )


def _queue_errors(call: Callable[[], object]) -> None:
    try:
        call()
    except (redis.RedisError, OperationalError) as exc:
        raise Unavailable(f"the job queue is unavailable: {exc}", code="queue_unavailable") from exc


def _claim(jobs: JobStore, key: str, job_id: str) -> str:
    try:
        return jobs.claim_idempotency_key(key, job_id)
    except redis.RedisError as exc:
        raise Unavailable(f"the job store is unavailable: {exc}", code="queue_unavailable") from exc


def _replay(jobs: JobStore, job_id: str) -> Submission:
    """The job an earlier request with the same key made, or 409 while that one still runs."""
    try:
        record = jobs.get(job_id)
    except NotFound:
        raise RequestInProgress(
            "a request with this Idempotency-Key is still being processed; retry shortly",
            job_id=job_id,
        ) from None
    return Submission(job_id, record["total"], [], replayed=True)


def _release(jobs: JobStore, key: str, job_id: str) -> None:
    """Forget a key whose request failed, unless another request holds it by now."""
    name = jobs.idempotency_key(key)
    with contextlib.suppress(redis.RedisError):
        if jobs.r.get(name) == job_id:
            jobs.r.delete(name)


def _store(blobs: BlobStore, found: Candidate) -> str:
    try:
        return blobs.put(found.data)
    except OSError as exc:
        raise Unavailable(f"cannot store the upload: {exc}", code="storage_unavailable") from exc
