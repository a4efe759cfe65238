"""One embed batch as plain functions: fetch → decode → encode → upsert → count, each timed."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.blobs import BlobStore
from shared.errors import NotFound, Unavailable
from shared.freshness import WriteMarks
from shared.jobs import FINAL_STATES, ItemResult, JobStore, Outcome
from shared.ml.encoder import ClipEncoder
from shared.ml.images import DecodeError, decode_sized
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


@dataclass(frozen=True, slots=True)
class Prepared:
    """An image ready for the model: its pixel values and original size."""

    pixels: torch.Tensor
    width: int
    height: int


def _rows(
    chunk: list[tuple[BatchItem, Prepared]], vectors: Any, *, job_id: str, metadata: dict[str, Any]
) -> list[dict[str, Any]]:
    now = int(time.time())
    return [
        {
            "image_id": it["image_id"],
            "vector": vec.tolist(),
            "filename": it["filename"],
            "job_id": job_id,
            "created_at": now,
            "width": p.width,
            "height": p.height,
            "metadata": metadata,
        }
        for (it, p), vec in zip(chunk, vectors, strict=True)
    ]


@dataclass
class Pipeline:
    """The parts a batch needs, built once per worker process."""

    encoder: ClipEncoder
    vectors: VectorStore
    blobs: BlobStore
    jobs: JobStore
    max_pixels: int
    pool: ThreadPoolExecutor
    io: ThreadPoolExecutor
    writes: WriteMarks | None = None  # when each write returned, for read-your-writes searches
    forward_batch: int = 32
    first_batch: int = 8
    draft: int | None = None  # decode large JPEGs at reduced scale, short side >= this
    # Told each batch's seconds per stage (the worker wires it to Prometheus).
    observe: Callable[[Mapping[str, float]], None] | None = None

    def _load(self, item: BatchItem) -> tuple[BatchItem, Prepared | DecodeError]:
        """Fetch, decode and preprocess one image (runs in the pool, beside the model)."""
        try:
            image, (width, height) = decode_sized(
                self.blobs.get(item["image_id"]), max_pixels=self.max_pixels, draft=self.draft
            )
        except NotFound:
            return item, DecodeError("blob_missing", "the stored bytes are gone")
        except DecodeError as exc:
            return item, exc
        return item, Prepared(self.encoder.prepare(image), width, height)

    def run(
        self, *, job_id: str, items: list[BatchItem], metadata: dict[str, Any], batch: str = ""
    ) -> str | None:
        """Index one batch of a running job and count every item; return the job's state."""
        stages = Stages()
        with stages.time("lookup"):
            self.vectors.ensure_collection(dim=self.encoder.dim)
            written = self.writes.last() if self.writes is not None else None
            owners = self.vectors.owners([it["image_id"] for it in items], written_at=written)
        results: list[ItemResult] = []
        todo: list[BatchItem] = []
        for it in items:
            owner = owners.get(it["image_id"])
            if owner is None:
                todo.append(it)
            else:  # a redelivered batch finds its own rows: they count as done, not duplicates
                outcome: Outcome = "done" if owner == job_id else "duplicates"
                results.append(ItemResult(it["key"], outcome, it["filename"]))
        # Every image is handed to the pool at once; the model takes them a forward batch at a
        # time as they become ready, so decoding overlaps the forward passes, and each
        # upsert overlaps the next forward pass.
        upserts: list[Future[None]] = []
        chunk: list[tuple[BatchItem, Prepared]] = []
        indexed = 0

        def flush() -> None:
            nonlocal indexed
            if not chunk:
                return
            with stages.time("encode"):
                vectors = self.encoder.encode_pixels(torch.stack([p.pixels for _, p in chunk]))
            rows = _rows(chunk, vectors, job_id=job_id, metadata=metadata)
            upserts.append(self.io.submit(self.vectors.upsert, rows))
            self.jobs.touch(job_id)  # a long batch is alive: the sweeper leaves its job alone
            results.extend(ItemResult(it["key"], "done", it["filename"]) for it, _ in chunk)
            indexed += len(chunk)
            chunk.clear()

        first = min(self.first_batch, self.forward_batch)
        loaded = self.pool.map(self._load, todo)
        while True:
            with stages.time("decode_wait"):
                nxt = next(loaded, None)
            if nxt is None:
                break
            it, prepared = nxt
            if isinstance(prepared, DecodeError):
                results.append(
                    ItemResult(it["key"], "failed", it["filename"], prepared.code, prepared.detail)
                )
                continue
            chunk.append((it, prepared))
            # The first pass of a batch starts small, as soon as a few images are ready, so
            # the model is not idle while the pool decodes a whole forward batch.
            if len(chunk) >= (self.forward_batch if indexed else first):
                flush()
        flush()
        with stages.time("upsert_wait"):
            for future in upserts:
                future.result()  # an outage raises here, before anything is counted
            if upserts and self.writes is not None:
                self.writes.mark()  # before the count: a finished job is searchable at once
        with stages.time("record"):
            state = self.jobs.record(job_id, results, batch=batch)
        if state in FINAL_STATES and indexed:
            with stages.time("settle"), contextlib.suppress(Unavailable):
                self.vectors.settle()  # this batch finished the job: seal its rows
        log.info(
            "job %s batch of %d: %d indexed, %d failed; %s",
            job_id,
            len(items),
            indexed,
            len(todo) - indexed,
            " ".join(f"{k}={v * 1000:.0f}ms" for k, v in stages.timings.items()),
            extra={"job_id": job_id, "stages": stages.timings},
        )
        if self.observe is not None:
            self.observe(stages.timings)
        return state

    def fail_all(
        self, *, job_id: str, items: list[BatchItem], code: str, detail: str, batch: str = ""
    ) -> None:
        """Give up on a batch: every item not yet counted is recorded as failed."""
        self.jobs.record(
            job_id,
            [ItemResult(it["key"], "failed", it["filename"], code, detail) for it in items],
            batch=batch,
        )
