"""One settings class, read from the environment under the same names in every service."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.safety import refuse_placeholders


class Settings(BaseSettings):
    """Runtime configuration; every field maps to the upper-case environment variable."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    milvus_uri: str = "http://127.0.0.1:19530"
    milvus_token: SecretStr | None = None
    milvus_collection: str = "clipsearch_images"
    # HNSW: recall@10 near exact at a fraction of brute force's cost (BENCHMARKS.md); FLAT is
    # exact. Applies when the collection is created.
    milvus_index: Literal["FLAT", "HNSW", "IVF_FLAT", "AUTOINDEX"] = "HNSW"
    # Session: a search sees every write that workers and the gateway recorded before it
    # (shared/freshness.py), and waits for Milvus only while such a write is in flight.
    # Strong waits for standalone Milvus's time tick on every search (~0.4 s here); Bounded
    # and Eventually may miss the last seconds of writes.
    milvus_search_consistency: Literal["Session", "Strong", "Bounded", "Eventually"] = "Session"
    clip_model: str = "openai/clip-vit-base-patch32"
    clip_device: Literal["auto", "cpu", "cuda"] = "auto"
    clip_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    clip_text_quant: Literal["auto", "int8", "none"] = "auto"
    data_dir: Path = Path("./data")
    blob_dir_override: Path | None = Field(default=None, validation_alias="BLOB_DIR")
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    api_keys_on_reads: bool = False
    query_url: str = "http://127.0.0.1:8001"
    gateway_port: int = 8000
    query_port: int = 8001
    embed_batch_size: int = Field(default=64, ge=1, le=4096)  # images per Celery task
    clip_batch_size: int = Field(default=32, ge=1, le=1024)  # images per forward pass
    # Decode JPEGs much larger than the model's input at reduced scale (4x input, at least).
    decode_draft: bool = True
    # Limits on what one request may bring in (safe defaults; see README).
    max_upload_bytes: int = 512 * 1024 * 1024
    max_file_bytes: int = 50 * 1024 * 1024
    max_files_per_job: int = 20_000
    max_image_pixels: int = 60_000_000
    max_archive_entries: int = 20_000
    max_archive_bytes: int = 2 * 1024 * 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    # Longest an embed task may run before the broker hands it to another worker.
    task_visibility_timeout_s: int = 3600
    # Blob store backend: `local` (BLOB_DIR) or `s3` (an S3-compatible bucket, for many hosts).
    # Without S3_ACCESS_KEY/S3_SECRET_KEY, boto3's own chain is used (AWS_ACCESS_KEY_ID, ...).
    blob_backend: Literal["local", "s3"] = "local"
    s3_endpoint_url: str | None = None
    s3_bucket: str = "clipsearch-blobs"
    s3_region: str | None = None
    s3_prefix: str = ""
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    # Access, rate limits and observability
    cors_origins: Annotated[list[str], NoDecode] = []  # comma-separated; "*" allows any
    # Per API key (or client IP without one), shared through Redis; "" or "0" disables.
    # Generous enough for a script that uploads one image per request in a loop.
    rate_limit_uploads: str = "3000/minute"
    rate_limit_searches: str = "6000/minute"
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)  # 0: no worker /metrics
    worker_metrics_host: str = "127.0.0.1"
    # Hardening (issue 16; shared/safety.py). Development only: start with placeholder secrets
    # (CHANGE_ME..., MinIO's minioadmin), and let a gateway reachable beyond loopback take
    # writes without API_KEYS.
    allow_insecure_defaults: bool = False
    # The address clients reach the gateway on: uvicorn's --host, or in a container the host
    # address its port is published on. Beyond loopback, writes need API_KEYS. Left unset,
    # each write is judged by the local address it reached.
    gateway_host: str = "127.0.0.1"
    # Thumbnail sizes served (any other is refused) and the disk cache's bound in bytes.
    thumbnail_sizes: Annotated[list[Annotated[int, Field(ge=16, le=2048)]], NoDecode] = [
        64,
        128,
        256,
        512,
    ]
    thumbnail_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Like RATE_LIMIT_SEARCHES, in a bucket of its own: a page of hits loads one per hit.
    rate_limit_thumbnails: str = "6000/minute"

    @field_validator("thumbnail_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return [size.strip() for size in value.split(",") if size.strip()]
        return value

    # Jobs. Every Redis key and the Celery queue carry CLIPSEARCH_NAMESPACE, so deployments
    # sharing one Redis stay apart; by default it is derived from MILVUS_URI and
    # MILVUS_COLLECTION (one index, one deployment).
    namespace_override: str | None = Field(default=None, validation_alias="CLIPSEARCH_NAMESPACE")
    # A running job none of whose batches moved for this long, with none of its messages left
    # in the queue, has lost a batch: the sweeper sends what was not counted again. Keep it
    # above the longest forward pass and the retry backoff (30 s at most).
    job_stall_timeout_s: int = Field(default=120, ge=2)
    job_max_requeues: int = Field(default=3, ge=0)  # then its images fail with `batch_lost`
    # A batch started this many times without ending killed its workers: it is split until
    # the image that kills them fails alone (`worker_crashed`).
    batch_max_attempts: int = Field(default=3, ge=1)
    # How long a finished job's records (counts, errors) are kept in Redis.
    job_retention: timedelta = timedelta(days=7)

    # Hardening II (issue 16): what one upload or image search may hold at once.
    # Uploads each gateway process reads at once; one more is answered 503 too_many_uploads.
    max_concurrent_uploads: int = Field(default=4, ge=1, le=1024)
    # CPU seconds one upload may spend expanding its archives; the rest: archive_too_slow.
    max_expand_cpu_s: float = Field(default=30.0, gt=0)
    # Longest an image search waits for the model; then 504 model_timeout.
    model_timeout_s: float = Field(default=10.0, gt=0)
    # Model calls waiting on the query process's model thread; one more is 503 model_busy.
    model_queue_size: int = Field(default=64, ge=1)

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @property
    def namespace(self) -> str:
        """The prefix of this deployment's Redis keys and Celery queue."""
        if self.namespace_override:
            return self.namespace_override
        where = hashlib.sha256(f"{self.milvus_uri}|{self.milvus_collection}".encode()).hexdigest()
        return f"clipsearch:{self.milvus_collection}:{where[:8]}"

    @property
    def blob_dir(self) -> Path:
        """Where image bytes live: BLOB_DIR, or DATA_DIR/blobs."""
        return self.blob_dir_override or self.data_dir / "blobs"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; placeholder secrets refuse to start a service."""
    return refuse_placeholders(Settings())
