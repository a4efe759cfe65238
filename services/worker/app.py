"""The Celery worker: loads the model once per process, then runs embed batches."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from celery import Task
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from pymilvus import MilvusException

from services.worker import metrics  # its signal handlers: metrics, JSON logs
from services.worker.pipeline import Pipeline
from services.worker.sweeper import Sweeper
from shared.blobs import make_blob_store
from shared.errors import Unavailable
from shared.freshness import WriteMarks
from shared.jobs import FINAL_STATES, JobStore
from shared.ml.encoder import IMAGE_ONLY, ClipEncoder
from shared.settings import get_settings
from shared.tasks import EMBED_TASK, BatchItem, enqueue_batch, make_celery, queue_key
from shared.vectors import VectorStore

log = logging.getLogger(__name__)
app = make_celery()
# A retry is published to the broker; keep trying through a short Redis outage.
app.conf.task_publish_retry_policy = {
    "max_retries": 40,
    "interval_start": 0.5,
    "interval_step": 0.5,
    "interval_max": 3.0,
}
# Errors that pass: retried with backoff; the batch is failed only after the last retry.
TRANSIENT = (Unavailable, MilvusException, redis.ConnectionError, redis.TimeoutError)
MAX_RETRIES = 10
_pipeline: Pipeline | None = None


def get_pipeline() -> Pipeline:
    """This process's pipeline, with the model loaded and warmed on first use."""
    global _pipeline
    if _pipeline is None:
        settings = get_settings()
        encoder = ClipEncoder.from_settings(settings, towers=IMAGE_ONLY)
        encoder.warmup()
        jobs = metrics.MeteredJobStore.from_settings(settings)
        _pipeline = Pipeline(
            encoder=encoder,
            vectors=VectorStore(
                uri=settings.milvus_uri,
                token=settings.milvus_token.get_secret_value() if settings.milvus_token else None,
                collection=settings.milvus_collection,
                index=settings.milvus_index,
            ),
            blobs=make_blob_store(settings),
            jobs=jobs,
            writes=WriteMarks(jobs.r, settings.milvus_collection, namespace=settings.namespace),
            max_pixels=settings.max_image_pixels,
            pool=ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)),
            io=ThreadPoolExecutor(max_workers=1),
            forward_batch=settings.clip_batch_size,
            draft=4 * encoder.input_size if settings.decode_draft else None,
            observe=metrics.observe_stages,
        )
    return _pipeline


_sweeping = threading.Event()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_sweeper(**_: Any) -> None:
    # In the worker's main process (the pool children run batches): find lost batches.
    settings = get_settings()
    sweeper = Sweeper(
        jobs=JobStore.from_settings(settings),
        app=app,
        queue_key=queue_key(settings),
        stall_s=settings.job_stall_timeout_s,
        max_requeues=settings.job_max_requeues,
    )
    interval = max(1.0, min(30.0, settings.job_stall_timeout_s / 4))
    threading.Thread(
        target=sweeper.run_forever,
        args=(_sweeping,),
        kwargs={"interval_s": interval},
        name="sweeper",
        daemon=True,
    ).start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_sweeper(**_: Any) -> None:
    _sweeping.set()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _load_model(**_: Any) -> None:
    # Load in the pool child before the first task so the first batch is not the slow one.
    get_pipeline()


@app.task(name=EMBED_TASK, bind=True, max_retries=MAX_RETRIES)  # type: ignore[untyped-decorator]
def embed_batch(
    self: Task,
    *,
    job_id: str,
    items: list[BatchItem],
    metadata: dict[str, Any],
    batch: str = "",
    seq: int = 0,
) -> str | None:
    """Embed one batch of a job's images; retry with backoff while Milvus or Redis is away."""
    pipeline = get_pipeline()
    started = pipeline.jobs.start(job_id, batch=batch, seq=seq)
    if started.state is None or started.state in FINAL_STATES:
        log.info("skipping batch of %d: job %s is %s", len(items), job_id, started.state)
        return started.state
    if started.attempts > get_settings().batch_max_attempts:
        return split_poison_batch(
            pipeline, job_id=job_id, items=items, metadata=metadata, batch=batch
        )
    try:
        return pipeline.run(job_id=job_id, items=items, metadata=metadata, batch=batch)
    except TRANSIENT as exc:
        retries = self.request.retries
        if retries >= MAX_RETRIES:
            log.error("job %s: giving up on a batch after %d retries: %s", job_id, retries, exc)
            pipeline.fail_all(
                job_id=job_id,
                items=items,
                batch=batch,
                code="index_unavailable",
                detail=f"the vector store stayed unavailable: {exc}",
            )
            return None
        pipeline.vectors.reset()
        pipeline.jobs.end_attempt(job_id, batch)  # this attempt ends alive: not a crash
        # Stay under the visibility timeout, or the broker would hand the batch out twice.
        cap = max(1, min(30, get_settings().task_visibility_timeout_s // 3))
        countdown = min(2**retries, cap)
        log.warning("job %s: retry %d in %ss: %s", job_id, retries + 1, countdown, exc)
        raise self.retry(exc=exc, countdown=countdown) from exc
    except Exception as exc:
        # A bug, not an outage: report every item of the batch instead of losing it silently.
        log.exception("job %s: batch failed", job_id)
        pipeline.fail_all(
            job_id=job_id,
            items=items,
            batch=batch,
            code="internal_error",
            detail=f"the worker failed on this batch: {exc.__class__.__name__}",
        )
        return None


def split_poison_batch(
    pipeline: Pipeline,
    *,
    job_id: str,
    items: list[BatchItem],
    metadata: dict[str, Any],
    batch: str,
) -> str | None:
    """A batch that killed its workers again and again: halve it until one image is left."""
    if len(items) == 1:
        item = items[0]
        log.error("job %s: %s killed the worker every time; failing it", job_id, item["filename"])
        pipeline.fail_all(
            job_id=job_id,
            items=items,
            batch=batch,
            code="worker_crashed",
            detail="the worker process died each time it read this image",
        )
        return pipeline.jobs.state(job_id)
    half = len(items) // 2
    log.warning("job %s: a batch of %d killed its workers; splitting it", job_id, len(items))
    for part in (items[:half], items[half:]):
        enqueue_batch(app, pipeline.jobs, job_id=job_id, items=part, metadata=metadata)
    pipeline.jobs.drop_batch(job_id, batch)
    return pipeline.jobs.state(job_id)
