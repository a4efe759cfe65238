"""The query app: the model is loaded and warmed before /readyz says ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Histogram
from pydantic import BaseModel, Field, field_validator

from services.query.batching import ModelRunner
from shared import logs
from shared.errors import InvalidInput, Unavailable
from shared.freshness import WriteMarks
from shared.ml.encoder import BOTH, ClipEncoder
from shared.ml.images import DecodeError, ImageRefused, check_header, decode_image
from shared.settings import Settings, get_settings
from shared.vectors import SearchFilters, VectorStore
from shared.web.health import Probe, health_router
from shared.web.http import install_cors, install_error_handlers
from shared.web.metrics import LATENCY_BUCKETS, instrument, metrics_response

log = logging.getLogger(__name__)
MAX_QUERY_CHARS = 100_000  # the model reads the first 77 tokens; the rest is dropped
SEARCH_SECONDS = Histogram(
    "clipsearch_search_seconds", "Searches, end to end, by kind", ["kind"], buckets=LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "clipsearch_search_stage_seconds",
    "Time in each stage of a search: encode (the model), search (Milvus)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)


class Filters(BaseModel):
    """Typed filters: each value is escaped as a literal (shared/vectors.py `literal`) before it
    goes into the expression; Milvus Lite ignores filter templates."""

    job_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    tag: str | None = Field(default=None, min_length=1, max_length=128)


class SearchBody(BaseModel):
    """POST /v1/search."""

    text: str = Field(max_length=MAX_QUERY_CHARS)
    k: int = Field(default=10, ge=1, le=200)
    min_score: float | None = Field(default=None, ge=-1.0, le=1.0)
    filters: Filters = Filters()

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query text is empty")
        return value


class Searcher:
    """The model and the collection one query process holds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.encoder: ClipEncoder | None = None
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
        self.vectors = VectorStore(
            uri=settings.milvus_uri,
            token=token,
            collection=settings.milvus_collection,
            index=settings.milvus_index,
            consistency=settings.milvus_search_consistency,
        )
        self.writes = WriteMarks.from_url(
            settings.redis_url, settings.milvus_collection, namespace=settings.namespace
        )
        self.load_error: str | None = None
        # Every forward pass of this process runs on this thread; callers wait in a bounded line.
        self.runner = ModelRunner(max_queue=settings.model_queue_size)
        self._text_cache = lru_cache(maxsize=1024)(self._encode_text)

    def load(self) -> None:
        def build() -> ClipEncoder:
            encoder = ClipEncoder.from_settings(self.settings, towers=BOTH)
            encoder.warmup()
            return encoder

        try:
            encoder = self.runner.call(build)
        except Exception as exc:
            self.load_error = str(exc)
            log.exception("model load failed")
            return
        self.runner.encode_texts = encoder.encode_texts
        self.encoder = encoder

    def close(self) -> None:
        self.runner.close()

    def _encode_text(self, text: str) -> np.ndarray:
        self.model()
        return self.runner.encode_text(text, timeout_s=self.settings.model_timeout_s)

    def model(self) -> ClipEncoder:
        if self.encoder is None:
            raise Unavailable(
                self.load_error or "the model is still loading", code="model_unavailable"
            )
        return self.encoder

    def search(
        self, vector: np.ndarray, *, k: int, min_score: float | None, filters: SearchFilters
    ) -> list[dict[str, Any]]:
        self.vectors.ensure_collection(dim=self.model().dim)
        with STAGE_SECONDS.labels("search").time():
            written = self.writes.last()
            before = time.time()
            hits = self.vectors.search(vector, k=k, filters=filters, written_at=written)
        if written is None and self.vectors.consistency == "Session":
            # Nothing recorded (a new Redis, say): that strong search saw every write made
            # before it started, so later searches need see no further back than that.
            with contextlib.suppress(Exception):
                self.writes.mark(before)
        out = []
        for hit in hits:
            if min_score is not None and hit["score"] < min_score:
                continue
            out.append(
                {
                    "image_id": hit["image_id"],
                    "score": round(hit["score"], 6),
                    "filename": hit.get("filename"),
                    "image_url": f"/v1/images/{hit['image_id']}",
                    "metadata": hit.get("metadata") or {},
                    "job_id": hit.get("job_id"),
                    "width": hit.get("width"),
                    "height": hit.get("height"),
                }
            )
        return out

    def text_search(self, body: SearchBody) -> dict[str, Any]:
        start = time.perf_counter()
        text = body.text.strip()
        self.model()
        with STAGE_SECONDS.labels("encode").time():
            vector = self._text_cache(text)
        hits = self.search(
            vector,
            k=body.k,
            min_score=body.min_score,
            filters=SearchFilters(job_id=body.filters.job_id, tag=body.filters.tag),
        )
        return self._answer(text, hits, start)

    def _answer(
        self, query: str, hits: list[dict[str, Any]], start: float, *, kind: str = "text"
    ) -> dict[str, Any]:
        elapsed = time.perf_counter() - start
        SEARCH_SECONDS.labels(kind).observe(elapsed)
        took = round(elapsed * 1000, 2)
        return {"query": query, "took_ms": took, "model": self.settings.clip_model, "hits": hits}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logs.configure("query", fmt=settings.log_format, level=settings.log_level)
    searcher = Searcher(settings)
    app.state.searcher = searcher
    # Load in the background so /healthz answers at once; /readyz waits for the model.
    task = asyncio.create_task(run_in_threadpool(searcher.load))
    yield
    await task
    searcher.close()


app = FastAPI(title="clipsearch query", version="0.1.0", lifespan=lifespan)
install_error_handlers(app)
instrument(app)
install_cors(app, get_settings().cors_origins)  # last: it wraps everything else


def _searcher(request: Request) -> Searcher:
    searcher: Searcher = request.app.state.searcher
    return searcher


@app.get("/v1/search")
def search_get(
    request: Request,
    q: Annotated[str, Query(max_length=MAX_QUERY_CHARS)],
    k: Annotated[int, Query(ge=1, le=200)] = 10,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
    job_id: Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$")] = None,
    tag: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> dict[str, Any]:
    """Images best matching the text, by cosine similarity."""
    if not q.strip():
        raise InvalidInput("the query text is empty", code="empty_query")
    body = SearchBody(text=q, k=k, min_score=min_score, filters=Filters(job_id=job_id, tag=tag))
    return _searcher(request).text_search(body)


@app.post("/v1/search")
def search_post(request: Request, body: SearchBody) -> dict[str, Any]:
    """Images best matching the text, by cosine similarity (JSON body)."""
    return _searcher(request).text_search(body)


@app.post("/v1/search/image")
def search_image(
    request: Request,
    file: Annotated[UploadFile, File()],
    k: Annotated[int, Query(ge=1, le=200)] = 10,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
) -> dict[str, Any]:
    """Images most like the uploaded one."""
    searcher = _searcher(request)
    start = time.perf_counter()
    settings = searcher.settings
    data = file.file.read(settings.max_file_bytes + 1)
    if len(data) > settings.max_file_bytes:
        raise InvalidInput("the image is over the size limit", code="file_too_large")
    try:  # format, pixels and aspect from the header, before anything is decoded
        check_header(data, max_pixels=settings.max_image_pixels)
        image = decode_image(data, max_pixels=settings.max_image_pixels)
    except (ImageRefused, DecodeError) as exc:
        raise InvalidInput(exc.detail, code=exc.code) from exc
    with STAGE_SECONDS.labels("encode").time():
        encoder = searcher.model()
        vector = searcher.runner.call(
            lambda: encoder.encode_images([image]), timeout_s=settings.model_timeout_s
        )[0]
    hits = searcher.search(vector, k=k, min_score=min_score, filters=SearchFilters())
    return searcher._answer(file.filename or "image", hits, start, kind="image")


@app.get("/metrics", include_in_schema=False)
def prometheus_metrics() -> Response:
    """Prometheus series: requests by route and status, latency, search stages."""
    return metrics_response()


def _probes(request: Request) -> dict[str, Probe]:
    searcher = _searcher(request)

    def model() -> None:
        if searcher.encoder is None:
            raise RuntimeError(searcher.load_error or "loading")

    return {"model": model, "milvus": searcher.vectors.probe}


app.include_router(
    health_router(_probes, model=lambda request: _searcher(request).settings.clip_model)
)
