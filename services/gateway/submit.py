"""Turn validated uploads into a job: store blobs, record the job, enqueue batches."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from services.gateway.ingest import Candidate, Limits, Rejection, clean_filename, expand
from shared.blobs import BlobStore
from shared.errors import PayloadTooLarge, Unavailable
from shared.jobs import ItemResult, JobStore
from shared.tasks import BatchItem, enqueue_batch


@dataclass
class Submission:
    """What one POST /v1/jobs produced."""

    job_id: str
    total: int
    rejected: list[Rejection] = field(default_factory=list)


def submit_job(
    *,
    uploads: Iterable[tuple[str, bytes]],
    metadata: dict[str, Any],
    limits: Limits,
    max_items: int,
    batch_size: int,
    blobs: BlobStore,
    jobs: JobStore,
    celery: Celery,
    idempotency_key: str | None = None,
) -> Submission:
    """Validate and store every image, record one job, enqueue its batches; embed nothing."""
    job_id = uuid.uuid4().hex
    if idempotency_key:
        earlier = jobs.claim_idempotency_key(idempotency_key, job_id)
        if earlier != job_id:
            record = jobs.get(earlier)
            return Submission(earlier, record["total"], [])
    items: list[BatchItem] = []
    counted: list[ItemResult] = []  # rejected and in-job duplicates, counted at once
    rejected: list[Rejection] = []
    seen: set[str] = set()
    n = 0
    for raw_name, data in uploads:
        for found in expand(clean_filename(raw_name), data, limits):
            n += 1
            if n > max_items:
                raise PayloadTooLarge(
                    f"a job holds at most {max_items} images", code="too_many_files"
                )
            key = f"i{n}"
            if isinstance(found, Rejection):
                rejected.append(found)
                counted.append(ItemResult(key, "failed", found.filename, found.code, found.detail))
                continue
            image_id = _store(blobs, found)
            if image_id in seen:
                counted.append(ItemResult(key, "duplicates", found.filename))
                continue
            seen.add(image_id)
            items.append({"key": key, "image_id": image_id, "filename": found.filename})
    try:
        jobs.create(total=n, rejected=counted, job_id=job_id)
        for start in range(0, len(items), batch_size):
            enqueue_batch(
                celery, job_id=job_id, items=items[start : start + batch_size], metadata=metadata
            )
    except (redis.RedisError, OperationalError) as exc:
        raise Unavailable(f"the job queue is unavailable: {exc}", code="queue_unavailable") from exc
    return Submission(job_id, n, rejected)


def _store(blobs: BlobStore, found: Candidate) -> str:
    try:
        return blobs.put(found.data)
    except OSError as exc:
        raise Unavailable(f"cannot store the upload: {exc}", code="storage_unavailable") from exc
