"""The gateway's own Prometheus series (requests and latency come from shared.web.metrics)."""

from __future__ import annotations

from prometheus_client import Counter

JOBS_CREATED = Counter("clipsearch_jobs_created_total", "Jobs recorded by POST /v1/jobs")
IMAGES_ACCEPTED = Counter(
    "clipsearch_images_accepted_total", "Images that passed validation and were queued"
)
IMAGES_REJECTED = Counter(
    "clipsearch_images_rejected_total", "Files refused at upload, by code", ["code"]
)
RATE_LIMITED = Counter(
    "clipsearch_rate_limited_total", "Requests refused with 429, by limit", ["scope"]
)
