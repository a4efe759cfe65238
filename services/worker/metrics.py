"""Worker metrics and logs, wired through Celery signals and the pipeline's stage observer.

Batches run in prefork pool children, separate processes: each counts into files under
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) and the worker's main process
serves their sum on WORKER_METRICS_PORT. The directory is chosen when the worker starts
(`worker_init`, before the pool forks) and the metrics are made on first use after that, so
importing this module changes nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from celery.signals import setup_logging, task_postrun, task_prerun, worker_init, worker_shutdown
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

from shared import logs
from shared.jobs import ItemResult, JobStore
from shared.settings import get_settings
from shared.tasks import EMBED_TASK

log = logging.getLogger(__name__)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class WorkerMetrics:
    """The worker's series (made after the multiprocess directory is chosen)."""

    def __init__(self) -> None:
        self.batches = Counter(
            "clipsearch_worker_batches_total", "Embed batches run, by Celery state", ["state"]
        )
        self.batch_images = Histogram(
            "clipsearch_worker_batch_images",
            "Images per embed batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
        )
        self.images = Counter(
            "clipsearch_worker_images_total",
            "Images counted into their jobs, by outcome",
            ["outcome"],
        )
        self.errors = Counter(
            "clipsearch_worker_errors_total", "Images that failed, by error code", ["code"]
        )
        self.stage_seconds = Histogram(
            "clipsearch_worker_stage_seconds",
            "Seconds per batch in each pipeline stage (lookup, decode, encode, upsert, record)",
            ["stage"],
            buckets=STAGE_BUCKETS,
        )


@cache
def metrics() -> WorkerMetrics:
    """This process's series, made on first use."""
    return WorkerMetrics()


def observe_stages(timings: Mapping[str, float]) -> None:
    """The pipeline's stage observer: seconds per stage of one batch."""
    for stage, seconds in timings.items():
        metrics().stage_seconds.labels(stage).observe(seconds)


_server: Any = None
_job_tokens: dict[str, Any] = {}


class MeteredJobStore(JobStore):
    """The job store, counting every recorded outcome and error code as it goes."""

    def record(self, job_id: str, results: Iterable[ItemResult], *, batch: str = "") -> str | None:
        results = list(results)
        state = super().record(job_id, results, batch=batch)
        for res in results:
            metrics().images.labels(res.outcome).inc()
            if res.outcome == "failed":
                metrics().errors.labels(res.code or "unknown").inc()
        return state


@setup_logging.connect  # type: ignore[untyped-decorator]
def _configure_logging(**_: Any) -> None:
    # Connected, so Celery leaves logging to us: JSON lines like the other services.
    settings = get_settings()
    logs.configure("worker", fmt=settings.log_format, level=settings.log_level)


@task_prerun.connect  # type: ignore[untyped-decorator]
def _job_in_hand(task_id: str = "", kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    job_id = (kwargs or {}).get("job_id")
    if isinstance(job_id, str):
        _job_tokens[task_id] = logs.JOB_ID.set(job_id)


@task_postrun.connect  # type: ignore[untyped-decorator]
def _batch_done(
    task_id: str = "",
    task: Any = None,
    kwargs: dict[str, Any] | None = None,
    state: str | None = None,
    **_: Any,
) -> None:
    token = _job_tokens.pop(task_id, None)
    if token is not None:
        logs.JOB_ID.reset(token)
    if getattr(task, "name", None) == EMBED_TASK:
        metrics().batches.labels(state or "UNKNOWN").inc()
        metrics().batch_images.observe(len((kwargs or {}).get("items") or []))


def _multiprocess_dir() -> None:
    """Count into files that the pool children share (a directory of our own unless the
    environment names one); series made from now on use it."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        path = tempfile.mkdtemp(prefix="clipsearch-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # pool children inherit it
        owner = os.getpid()

        def remove() -> None:
            if os.getpid() == owner:  # not in a pool child that happens to run atexit hooks
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


@worker_init.connect  # type: ignore[untyped-decorator]
def _serve(**_: Any) -> None:
    """In the worker's main process: serve every pool child's series on WORKER_METRICS_PORT."""
    global _server
    _multiprocess_dir()
    settings = get_settings()
    if not settings.worker_metrics_port:
        return
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    try:
        _server, _thread = start_http_server(
            settings.worker_metrics_port, settings.worker_metrics_host, registry=registry
        )
    except OSError as exc:  # another worker on this host has the port: run without it
        log.warning("worker metrics not served on port %d: %s", settings.worker_metrics_port, exc)
        return
    log.info(
        "worker metrics on http://%s:%d/metrics",
        settings.worker_metrics_host,
        settings.worker_metrics_port,
    )


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_serving(**_: Any) -> None:
    if _server is not None:
        _server.shutdown()
