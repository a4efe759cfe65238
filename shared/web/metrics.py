"""Prometheus metrics for the HTTP services: requests by route and status, latency, /metrics."""

from __future__ import annotations

import os

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as prom_metrics

# Seconds; searches take milliseconds, uploads of large archives can take a minute.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def instrument(app: FastAPI) -> None:
    """Count requests by route template, method and status, and time them (not /metrics)."""
    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=["/metrics"],
    ).add(
        prom_metrics.requests(),
        prom_metrics.latency(buckets=LATENCY_BUCKETS),
    ).instrument(app)


def metrics_response() -> Response:
    """This process's series in the text format; every process's under multiprocess mode."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several server processes (uvicorn --workers N): sum what each one wrote.
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
