"""Check and repair: compare the blob store, Milvus and the job records, and mend the drift.

Bytes without a vector are embedded again from the stored bytes (a job of their own); vectors
without bytes cannot be shown and are removed. Images of jobs still running, and bytes
written in the last `grace_s`, are in flight, not drift. Stuck jobs are reported; the
workers' sweeper sends their lost batches again (services/worker/sweeper.py).
"""

from __future__ import annotations

import time

from celery import Celery
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from services.gateway.auth import require_write
from shared.blobs import BlobStore
from shared.freshness import WriteMarks
from shared.jobs import FINAL_STATES, JobStore
from shared.tasks import BatchItem, enqueue_batch
from shared.vectors import VectorStore

SAMPLE = 100  # ids listed per kind of drift; the counts are whole


class CheckRequest(BaseModel):
    """What `POST /v1/admin/check` is asked to do."""

    repair: bool = False
    grace_seconds: float = Field(
        default=600.0, ge=0, description="bytes younger than this are uploads in progress"
    )


class StuckJob(BaseModel):
    """A job not ended that no batch has touched for longer than the stall timeout."""

    job_id: str
    state: str
    idle_seconds: float
    uncounted_images: int


class Drift(BaseModel):
    """How many ids are in one place and not the other, and the first of them."""

    count: int
    sample: list[str]


class CheckReport(BaseModel):
    """What the check found, and what the repair did."""

    blobs: int
    vectors: int
    in_flight: int = Field(description="images of running jobs and fresh bytes, not drift")
    bytes_without_vectors: Drift
    vectors_without_bytes: Drift
    stuck_jobs: list[StuckJob]
    clean: bool
    repair_job_id: str | None = None
    removed_vectors: int = 0


def check(
    *,
    blobs: BlobStore,
    vectors: VectorStore,
    jobs: JobStore,
    stall_s: float,
    grace_s: float = 600.0,
    now: float | None = None,
) -> tuple[CheckReport, list[str], list[str]]:
    """The report, with every id of bytes without vectors and of vectors without bytes."""
    now = time.time() if now is None else now
    in_flight: set[str] = set()
    stuck = []
    for job_id in jobs.active():
        raw = jobs.raw(job_id)
        if not raw or raw.get("state") in FINAL_STATES:
            continue
        pending = [it for b in jobs.pending_batches(job_id) for it in b.items]
        in_flight.update(it["image_id"] for it in pending)
        idle = now - float(raw.get("touched_at") or raw["created_at"])
        if idle > stall_s:
            stuck.append(
                StuckJob(
                    job_id=job_id,
                    state=raw["state"],
                    idle_seconds=round(idle, 1),
                    uncounted_images=len(pending),
                )
            )
    stored: set[str] = set()
    settled: set[str] = set()  # written before the grace period: not an upload in progress
    for key, written_at in blobs.listing():
        stored.add(key)
        if written_at < now - grace_s:
            settled.add(key)
    indexed = vectors.ids()
    unembedded = sorted(settled - indexed - in_flight)
    orphans = sorted(indexed - stored)
    report = CheckReport(
        blobs=len(stored),
        vectors=len(indexed),
        in_flight=len((stored - indexed) - set(unembedded)),
        bytes_without_vectors=Drift(count=len(unembedded), sample=unembedded[:SAMPLE]),
        vectors_without_bytes=Drift(count=len(orphans), sample=orphans[:SAMPLE]),
        stuck_jobs=stuck,
        clean=not (unembedded or orphans or stuck),
    )
    return report, unembedded, orphans


def repair(
    report: CheckReport,
    *,
    unembedded: list[str],
    orphans: list[str],
    vectors: VectorStore,
    writes: WriteMarks,
    jobs: JobStore,
    celery: Celery,
    batch_size: int,
) -> CheckReport:
    """Embed the bytes without vectors again (one job) and remove the vectors without bytes."""
    if orphans:
        vectors.remove(orphans)
        writes.mark()  # searches from now on must not return them
        report.removed_vectors = len(orphans)
    if unembedded:
        job_id = jobs.create(total=len(unembedded), metadata={})
        items: list[BatchItem] = [
            {"key": f"i{n}", "image_id": image_id, "filename": image_id}
            for n, image_id in enumerate(unembedded, 1)
        ]
        for start in range(0, len(items), batch_size):
            enqueue_batch(
                celery, jobs, job_id=job_id, items=items[start : start + batch_size], metadata={}
            )
        report.repair_job_id = job_id
    return report


router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/check", dependencies=[Depends(require_write)])
def admin_check(request: Request, body: CheckRequest) -> CheckReport:
    """Compare the blob store, Milvus and the job records; with `repair`, mend the drift."""
    g = request.app.state.gw
    settings = g.settings
    report, unembedded, orphans = check(
        blobs=g.blobs,
        vectors=g.vectors,
        jobs=g.jobs,
        stall_s=settings.job_stall_timeout_s,
        grace_s=body.grace_seconds,
    )
    if body.repair:
        report = repair(
            report,
            unembedded=unembedded,
            orphans=orphans,
            vectors=g.vectors,
            writes=g.writes,
            jobs=g.jobs,
            celery=g.celery,
            batch_size=settings.embed_batch_size,
        )
    return report
