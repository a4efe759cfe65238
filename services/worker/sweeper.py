"""No job waits forever: find batches the broker lost and send them again.

A broker outage can lose a message the broker already handed out (popped, but not yet
recorded as unacked when Redis went away), or the counts a batch reported. Every batch is
recorded in its job until it is counted (shared/jobs.py), so a job that stops moving can be
compared with what is still on its way. A job is stalled when none of its batches touched it
for JOB_STALL_TIMEOUT_S and none of its messages can still be waiting in the queue (the queue
is empty, or a message sent after its last one has been taken: the queue is first in, first
out). Its uncounted items are then sent again; counting is exactly-once and a batch that
finds its own rows in Milvus skips them, so a batch sent twice costs a lookup, nothing more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from celery import Celery

from shared.errors import Conflict, NotFound
from shared.jobs import FINAL_STATES, ItemResult, JobStore
from shared.tasks import BatchItem, enqueue_batch

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    """What one pass did."""

    requeued: dict[str, int] = field(default_factory=dict)  # job id -> images sent again
    lost: dict[str, int] = field(default_factory=dict)  # job id -> images failed `batch_lost`
    interrupted: list[str] = field(default_factory=list)  # jobs cancelled: upload cut short


@dataclass
class Sweeper:
    """Finds stalled jobs and sends their uncounted batches again, a bounded number of times."""

    jobs: JobStore
    app: Celery
    queue_key: str
    stall_s: float
    max_requeues: int

    def sweep(self, now: float | None = None) -> Sweep:
        """One pass over the active jobs."""
        now = time.time() if now is None else now
        out = Sweep()
        waiting = int(self.jobs.r.llen(self.queue_key))
        taken = self.jobs.taken_seq()
        for job_id in self.jobs.active():
            raw = self.jobs.raw(job_id)
            if not raw or raw.get("state") in FINAL_STATES:
                self.jobs.forget_active(job_id)
                continue
            if now - float(raw.get("touched_at") or raw["created_at"]) < self.stall_s:
                continue
            if waiting and taken < int(raw.get("last_seq") or 0):
                continue  # its messages are still in the queue, waiting their turn
            self._resend(job_id, raw, out)
        return out

    def _resend(self, job_id: str, raw: dict[str, str], out: Sweep) -> None:
        pending = self.jobs.pending_batches(job_id)
        if not pending:
            # Every batch sent was counted, yet the job is short of its total: the request
            # that was storing its images died part way.
            with contextlib.suppress(Conflict, NotFound):
                self.jobs.cancel(job_id, reason="upload_interrupted")
                out.interrupted.append(job_id)
                log.warning("job %s: its upload stopped part way; cancelled", job_id)
            return
        metadata = json.loads(raw.get("metadata") or "{}")
        for batch in pending:
            items: list[BatchItem] = [
                {"key": it["key"], "image_id": it["image_id"], "filename": it["filename"]}
                for it in batch.items
            ]
            if items and batch.requeues >= self.max_requeues:
                results = [
                    ItemResult(
                        it["key"],
                        "failed",
                        it["filename"],
                        "batch_lost",
                        f"the batch was lost {batch.requeues + 1} times in broker outages",
                    )
                    for it in items
                ]
                self.jobs.record(job_id, results, batch=str(batch.number))
                out.lost[job_id] = out.lost.get(job_id, 0) + len(items)
                continue
            if items:
                enqueue_batch(
                    self.app,
                    self.jobs,
                    job_id=job_id,
                    items=items,
                    metadata=metadata,
                    requeues=batch.requeues + 1,
                )
                out.requeued[job_id] = out.requeued.get(job_id, 0) + len(items)
            self.jobs.drop_batch(job_id, str(batch.number))
        self.jobs.touch(job_id)  # the new messages get a whole stall period
        if job_id in out.requeued:
            log.warning(
                "job %s stalled: sent %d uncounted images again", job_id, out.requeued[job_id]
            )

    def run_forever(self, stop: threading.Event, *, interval_s: float) -> None:
        """Sweep every `interval_s`; one worker of the deployment at a time (a Redis lease)."""
        lease = self.jobs.key("sweeper")
        while not stop.wait(interval_s):
            try:
                if self.jobs.r.set(lease, "1", nx=True, px=int(interval_s * 900)):
                    self.sweep()
            except Exception:
                log.warning("sweep failed; trying again in %ss", interval_s, exc_info=True)
