"""The gateway app: uploads and jobs, images, the search proxy, health."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field

from services.gateway import admin, metrics, thumbnails
from services.gateway.auth import (
    OPEN_WRITES_REFUSED,
    client_identity,
    require_read,
    require_write,
)
from services.gateway.bodylimit import MAX_SMALL_BODY, BodyLimit
from services.gateway.ingest import Limits
from services.gateway.metadata import parse_metadata
from services.gateway.ratelimit import RateLimits, limit, parse_rule
from services.gateway.spool import spool_form
from services.gateway.submit import submit_job
from services.gateway.upstream import QueryService
from shared import logs
from shared.blobs import make_blob_store
from shared.errors import InvalidInput, NotFound, Unavailable
from shared.freshness import WriteMarks
from shared.jobs import JobStore
from shared.safety import open_writes_exposed
from shared.settings import Settings, get_settings
from shared.tasks import make_celery
from shared.vectors import VectorStore
from shared.web.health import Probe, health_router
from shared.web.http import install_cors, install_error_handlers
from shared.web.metrics import instrument, metrics_response

log = logging.getLogger(__name__)
JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")]
STATIC = Path(__file__).parent / "static"
ImageId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$")]


class Gateway:
    """The clients and stores one gateway process holds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs = JobStore.from_settings(settings)
        self.writes = WriteMarks(
            self.jobs.r, settings.milvus_collection, namespace=settings.namespace
        )
        self.blobs = make_blob_store(settings)
        self.celery = make_celery(settings)
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
        self.vectors = VectorStore(
            uri=settings.milvus_uri,
            token=token,
            collection=settings.milvus_collection,
            index=settings.milvus_index,
        )
        self.limits = Limits(
            max_file_bytes=settings.max_file_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_archive_entries=settings.max_archive_entries,
            max_archive_bytes=settings.max_archive_bytes,
            max_expand_cpu_s=settings.max_expand_cpu_s,
        )
        self.rate_limits = RateLimits(
            redis_url=settings.redis_url,
            namespace=settings.namespace,
            rules={
                "uploads": parse_rule(settings.rate_limit_uploads, name="RATE_LIMIT_UPLOADS"),
                "searches": parse_rule(settings.rate_limit_searches, name="RATE_LIMIT_SEARCHES"),
                "thumbnails": parse_rule(
                    settings.rate_limit_thumbnails, name="RATE_LIMIT_THUMBNAILS"
                ),
            },
        )
        self.thumbs = thumbnails.ThumbnailCache(
            settings.data_dir / "thumbs", max_bytes=settings.thumbnail_cache_bytes
        )
        # One pooled keep-alive client to the query service.
        self.query = QueryService(settings.query_url)
        self.uploading = 0  # POST /v1/jobs requests being read now (MAX_CONCURRENT_UPLOADS)


class UploadsBusy(Unavailable):
    """Every upload slot of this process is taken: retry shortly."""

    code = "too_many_uploads"
    headers = {"Retry-After": "2", "Connection": "close"}  # the unread body is not drained


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logs.configure("gateway", fmt=settings.log_format, level=settings.log_level)
    if open_writes_exposed(settings):
        log.warning(OPEN_WRITES_REFUSED.format(where=f"GATEWAY_HOST={settings.gateway_host}"))
    app.state.gw = Gateway(settings)
    yield
    await app.state.gw.query.close()


app = FastAPI(title="clipsearch gateway", version="0.1.0", lifespan=lifespan)
install_error_handlers(app)


def gw(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gw
    return gateway


def _body_limit(method: str, path: str) -> int | None:
    """The most bytes a request to this route may send."""
    if method in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return None
    s = get_settings()
    if path == "/v1/jobs":
        return s.max_upload_bytes
    if path == "/v1/search/image":
        return s.max_file_bytes + 64 * 1024  # the image and its multipart framing
    return MAX_SMALL_BODY


app.add_middleware(BodyLimit, limit_for=_body_limit)
instrument(app)
install_cors(app, get_settings().cors_origins)  # last: it wraps everything else


# The body is read by hand (streamed, limits checked as it comes); this documents it.
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "metadata": {"type": "string", "description": "a JSON object"},
                },
            }
        }
    },
}


@app.post(
    "/v1/jobs",
    status_code=202,
    dependencies=[Depends(require_write), Depends(limit("uploads"))],
    openapi_extra={"requestBody": UPLOAD_BODY},
)
async def create_job(request: Request) -> JSONResponse:
    """Accept images (or zip/tar archives of them) as one job; embedding happens later."""
    g = gw(request)
    s = g.settings
    if g.uploading >= s.max_concurrent_uploads:  # before a byte of the body is read
        raise UploadsBusy(
            f"{g.uploading} uploads are being read; the limit is {s.max_concurrent_uploads}"
        )
    g.uploading += 1
    try:
        form = await spool_form(
            request.headers.get("content-type", ""),
            request.stream(),
            field_name="files",
            max_files=s.max_files_per_job,
            max_fields=100,
            max_field_bytes=s.max_metadata_bytes,
        )
        try:
            if not form.files:
                raise InvalidInput(
                    "no files: send images as repeated multipart 'files' fields", code="no_files"
                )
            metas = form.fields.get("metadata", [])
            raw_meta = metas[0] if metas else None
            metadata = parse_metadata(raw_meta, limit=s.max_metadata_bytes)
            sub = await run_in_threadpool(
                lambda: submit_job(
                    uploads=[(name or "unnamed", fh) for name, fh in form.files],
                    metadata=metadata,
                    limits=g.limits,
                    max_items=s.max_files_per_job,
                    batch_size=s.embed_batch_size,
                    blobs=g.blobs,
                    jobs=g.jobs,
                    celery=g.celery,
                    idempotency_key=request.headers.get("idempotency-key"),
                    idempotency_scope=_idempotency_scope(request),
                )
            )
        finally:
            form.close()
    finally:
        g.uploading -= 1
    if sub.replayed:
        log.info("job %s returned again for its Idempotency-Key", sub.job_id)
    else:
        metrics.JOBS_CREATED.inc()
        metrics.IMAGES_ACCEPTED.inc(sub.total - len(sub.rejected))
        for r in sub.rejected:
            metrics.IMAGES_REJECTED.labels(r.code).inc()
        log.info(
            "job %s created: %d images, %d rejected",
            sub.job_id,
            sub.total,
            len(sub.rejected),
            extra={"job_id": sub.job_id, "total": sub.total, "rejected": len(sub.rejected)},
        )
    body: dict[str, Any] = {
        "job_id": sub.job_id,
        "status_url": f"/v1/jobs/{sub.job_id}",
        "total": sub.total,
        "rejected": [
            {"filename": r.filename, "code": r.code, "detail": r.detail} for r in sub.rejected
        ],
    }
    headers = {"Location": body["status_url"]}
    if sub.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=202, headers=headers)


def _idempotency_scope(request: Request) -> str:
    """Idempotency keys are per API key (clients without one share a scope)."""
    who = client_identity(request)
    return who if who.startswith("key:") else ""


@app.get("/v1/jobs", dependencies=[Depends(require_read)])
def list_jobs(request: Request, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    """Recent jobs, newest first."""
    return {"jobs": gw(request).jobs.recent(limit=limit)}


@app.get("/v1/jobs/{job_id}", dependencies=[Depends(require_read)])
def get_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """A job's state, counters, timings and per-item errors."""
    return gw(request).jobs.get(job_id)


@app.delete("/v1/jobs/{job_id}", dependencies=[Depends(require_write)])
def cancel_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """Cancel a job: batches not yet started are skipped."""
    g = gw(request)
    g.jobs.cancel(job_id)
    return g.jobs.get(job_id)


@app.get("/v1/images/{image_id}", dependencies=[Depends(require_read)])
def get_image(request: Request, image_id: ImageId) -> Response:
    """The stored bytes of an image, with their content type."""
    blobs = gw(request).blobs
    cache = _cache_control()
    path = blobs.local_path(image_id)
    if path is None:  # no local file (S3, or missing: get() raises NotFound)
        data = blobs.get(image_id)
        return Response(data, media_type=_media_type(io.BytesIO(data)), headers=cache)
    return FileResponse(path, media_type=_media_type(path), headers=cache)


@app.get(
    "/v1/images/{image_id}/thumbnail",
    dependencies=[Depends(require_read), Depends(limit("thumbnails"))],
)
def get_thumbnail(request: Request, image_id: ImageId, size: int | None = None) -> Response:
    """A small JPEG of the image (EXIF orientation applied) in one of THUMBNAIL_SIZES."""
    g = gw(request)
    allowed = g.settings.thumbnail_sizes
    if size is None:  # the configured size nearest 256
        size = min(allowed, key=lambda s: abs(s - 256)) if allowed else 256
    thumbnails.check_size(size, allowed)
    data = thumbnails.thumbnail(g.blobs, image_id, size=size, cache=g.thumbs)
    return Response(data, media_type="image/jpeg", headers=_cache_control())


def _cache_control() -> dict[str, str]:
    """Bytes never change under an id; shared caches may keep them only when reads are open."""
    scope = "private" if get_settings().api_keys_on_reads else "public"
    return {"Cache-Control": f"{scope}, max-age=31536000, immutable"}


class ImageIds(BaseModel):
    """POST /v1/images/lookup."""

    image_ids: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(max_length=10_000)


@app.post("/v1/images/lookup", dependencies=[Depends(require_read)])
def lookup_images(request: Request, body: ImageIds) -> dict[str, list[str]]:
    """Which of these image ids are already indexed (lets clients skip re-uploads)."""
    g = gw(request)
    if not body.image_ids or not g.vectors.exists():
        return {"indexed": []}
    owners = g.vectors.owners(body.image_ids)
    return {"indexed": [i for i in body.image_ids if i in owners]}


def _media_type(source: Path | io.BytesIO) -> str:
    try:
        with Image.open(source) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (OSError, ValueError):
        return "application/octet-stream"


@app.delete("/v1/images/{image_id}", dependencies=[Depends(require_write)])
def delete_image(request: Request, image_id: ImageId) -> dict[str, Any]:
    """Remove an image's vector and bytes."""
    g = gw(request)
    # Bytes first: a crash in between leaves a vector without bytes, which
    # `clipsearch admin check --repair` removes; the other order would leave bytes that a
    # repair embeds again, bringing the deleted image back.
    had_blob = g.blobs.delete(image_id)
    g.thumbs.purge(image_id)
    removed = g.vectors.delete(image_id) if g.vectors.exists() else 0
    if removed:
        g.writes.mark()  # searches from now on must not return it
    if not removed and not had_blob:
        raise NotFound(f"no image {image_id}", code="image_not_found")
    return {"image_id": image_id, "deleted": True}


async def _proxy(request: Request, method: str, path: str, *, body: bool = False) -> Response:
    """The query service's answer to this request, passed through as it is."""
    headers = {"content-type": request.headers.get("content-type", "")} if body else None
    answer = await gw(request).query.request(
        method,
        path,
        params=request.query_params.multi_items(),
        body=await request.body() if body else None,
        headers=headers,
    )
    return Response(answer.body, answer.status, media_type=answer.content_type)


@app.get("/v1/search", dependencies=[Depends(require_read), Depends(limit("searches"))])
async def search(request: Request) -> Response:
    """Text search, answered by the query service."""
    return await _proxy(request, "GET", "/v1/search")


@app.post("/v1/search", dependencies=[Depends(require_read), Depends(limit("searches"))])
async def search_post(request: Request) -> Response:
    """Text search with a JSON body, answered by the query service."""
    return await _proxy(request, "POST", "/v1/search", body=True)


@app.post("/v1/search/image", dependencies=[Depends(require_read), Depends(limit("searches"))])
async def search_image(request: Request) -> Response:
    """Image-to-image search, answered by the query service."""
    return await _proxy(request, "POST", "/v1/search/image", body=True)


app.include_router(admin.router)


def _probes(request: Request) -> dict[str, Probe]:
    g = gw(request)
    return {"redis": g.jobs.ping, "milvus": g.vectors.probe, "blobs": g.blobs.ping}


app.include_router(health_router(_probes))


@app.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The web page: search, upload, jobs."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_read)])
def prometheus_metrics() -> Response:
    """Prometheus series: requests by route and status, latency, jobs, images, 429s."""
    return metrics_response()
