"""The Celery app every service shares: broker settings, the queue and task names."""

from __future__ import annotations

from typing import Any, TypedDict

from celery import Celery

from shared.jobs import JobStore
from shared.settings import Settings, get_settings

EMBED_QUEUE = "embed"
EMBED_TASK = "clipsearch.embed_batch"


def queue_key(settings: Settings) -> str:
    """The Redis list that holds the embed queue's waiting messages."""
    return f"{settings.namespace}:{EMBED_QUEUE}"


class BatchItem(TypedDict):
    """One image of a batch message: its key within the job, blob id and filename."""

    key: str
    image_id: str
    filename: str


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app on the Redis broker with at-least-once delivery and no result backend."""
    settings = settings or get_settings()
    app = Celery("clipsearch", broker=settings.redis_url)
    app.conf.update(
        task_default_queue=EMBED_QUEUE,
        task_routes={EMBED_TASK: {"queue": EMBED_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Job state lives in our own Redis records; Celery only carries batches.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Every key kombu writes (the queue, unacked messages) carries the namespace.
            "global_keyprefix": f"{settings.namespace}:",
            "visibility_timeout": settings.task_visibility_timeout_s,
            # Look for batches of dead workers every few seconds (kombu's default is ~100 s);
            # they are handed out again once older than the visibility timeout.
            "unacked_restore_interval": max(1, min(10, settings.task_visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        # A batch that hangs is ended; its job's sweeper sends what it did not count again.
        task_time_limit=max(60, settings.task_visibility_timeout_s),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def enqueue_batch(
    app: Celery,
    jobs: JobStore,
    *,
    job_id: str,
    items: list[BatchItem],
    metadata: dict[str, Any],
    requeues: int = 0,
) -> None:
    """Record one embed batch in its job, then send it by task name (the sender never imports
    the worker code)."""
    number, seq = jobs.add_batch(job_id, list(items), requeues=requeues)
    app.send_task(
        EMBED_TASK,
        kwargs={
            "job_id": job_id,
            "items": items,
            "metadata": metadata,
            "batch": str(number),
            "seq": seq,
        },
        queue=EMBED_QUEUE,
    )
