"""One embed batch as plain functions: fetch → decode → encode → upsert → count, each timed."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from services.worker.decode import DecodeError, decode_image
from shared.blobs import BlobStore
from shared.encoder import ClipEncoder
from shared.errors import NotFound
from shared.jobs import FINAL_STATES, ItemResult, JobStore, Outcome
from shared.tasks import BatchItem
from shared.vectors import VectorStore

log = logging.getLogger(__name__)


@dataclass
class Stages:
    """Seconds spent in each stage of one batch."""

    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Pipeline:
    """The parts a batch needs, built once per worker process."""

    encoder: ClipEncoder
    vectors: VectorStore
    blobs: BlobStore
    jobs: JobStore
    max_pixels: int
    pool: ThreadPoolExecutor

    def _load(self, item: BatchItem) -> tuple[BatchItem, Image.Image | DecodeError]:
        try:
            return item, decode_image(self.blobs.get(item["image_id"]), max_pixels=self.max_pixels)
        except NotFound:
            return item, DecodeError("blob_missing", "the stored bytes are gone")
        except DecodeError as exc:
            return item, exc

    def run(self, *, job_id: str, items: list[BatchItem], metadata: dict[str, Any]) -> str | None:
        """Index one batch and count every item; return the job's state afterwards."""
        stages = Stages()
        state = self.jobs.start(job_id)
        if state is None or state in FINAL_STATES:
            log.info("skipping batch of %d: job %s is %s", len(items), job_id, state)
            return state
        with stages.time("lookup"):
            self.vectors.ensure_collection(dim=self.encoder.dim)
            owners = self.vectors.owners([it["image_id"] for it in items])
        results: list[ItemResult] = []
        todo: list[BatchItem] = []
        for it in items:
            owner = owners.get(it["image_id"])
            if owner is None:
                todo.append(it)
            else:  # a redelivered batch finds its own rows: they count as done, not duplicates
                outcome: Outcome = "done" if owner == job_id else "duplicates"
                results.append(ItemResult(it["key"], outcome, it["filename"]))
        with stages.time("decode"):
            loaded = list(self.pool.map(self._load, todo))
        good: list[tuple[BatchItem, Image.Image]] = []
        for it, image in loaded:
            if isinstance(image, DecodeError):
                results.append(
                    ItemResult(it["key"], "failed", it["filename"], image.code, image.detail)
                )
            else:
                good.append((it, image))
        if good:
            with stages.time("encode"):
                vectors = self.encoder.encode_images([image for _, image in good])
            now = int(time.time())
            rows = [
                {
                    "image_id": it["image_id"],
                    "vector": vec.tolist(),
                    "filename": it["filename"],
                    "job_id": job_id,
                    "created_at": now,
                    "width": image.width,
                    "height": image.height,
                    "metadata": metadata,
                }
                for (it, image), vec in zip(good, vectors, strict=True)
            ]
            with stages.time("upsert"):
                self.vectors.upsert(rows)
            results += [ItemResult(it["key"], "done", it["filename"]) for it, _ in good]
        with stages.time("record"):
            state = self.jobs.record(job_id, results)
        log.info(
            "job %s batch of %d: %d indexed, %d failed; %s",
            job_id,
            len(items),
            len(good),
            len(loaded) - len(good),
            " ".join(f"{k}={v * 1000:.0f}ms" for k, v in stages.timings.items()),
            extra={"job_id": job_id, "stages": stages.timings},
        )
        return state

    def fail_all(self, *, job_id: str, items: list[BatchItem], code: str, detail: str) -> None:
        """Give up on a batch: every item not yet counted is recorded as failed."""
        self.jobs.record(
            job_id, [ItemResult(it["key"], "failed", it["filename"], code, detail) for it in items]
        )
