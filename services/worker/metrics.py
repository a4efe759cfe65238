"""Worker metrics and logs, hooked in through Celery signals and the pipeline's batch log line.

Batches run in prefork pool children, separate processes: each counts into files under
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) and the worker's main process
serves their sum on WORKER_METRICS_PORT. The directory must be chosen before prometheus_client
is first imported, hence the code above the imports below.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def _multiprocess_dir() -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # chosen by whoever runs the worker
    path = tempfile.mkdtemp(prefix="clipsearch-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # pool children inherit it
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a pool child that happens to run atexit hooks
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)


_multiprocess_dir()

import logging  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from typing import Any  # noqa: E402

from celery.signals import (  # noqa: E402
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_shutdown,
)
from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

from shared import logs  # noqa: E402
from shared.jobs import ItemResult, JobStore  # noqa: E402
from shared.settings import get_settings  # noqa: E402
from shared.tasks import EMBED_TASK  # noqa: E402

log = logging.getLogger(__name__)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCHES = Counter(
    "clipsearch_worker_batches_total", "Embed batches run, by Celery state", ["state"]
)
BATCH_IMAGES = Histogram(
    "clipsearch_worker_batch_images",
    "Images per embed batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
IMAGES = Counter(
    "clipsearch_worker_images_total", "Images counted into their jobs, by outcome", ["outcome"]
)
ERRORS = Counter("clipsearch_worker_errors_total", "Images that failed, by error code", ["code"])
STAGE_SECONDS = Histogram(
    "clipsearch_worker_stage_seconds",
    "Seconds per batch in each pipeline stage (lookup, decode, encode, upsert, record)",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
_server: Any = None
_job_tokens: dict[str, Any] = {}


class MeteredJobStore(JobStore):
    """The job store, counting every recorded outcome and error code as it goes."""

    def record(self, job_id: str, results: Iterable[ItemResult], *, batch: str = "") -> str | None:
        results = list(results)
        state = super().record(job_id, results, batch=batch)
        for res in results:
            IMAGES.labels(res.outcome).inc()
            if res.outcome == "failed":
                ERRORS.labels(res.code or "unknown").inc()
        return state


class StageTimings(logging.Handler):
    """Observe the per-stage seconds the pipeline logs with each batch (`extra["stages"]`)."""

    def emit(self, record: logging.LogRecord) -> None:
        stages = getattr(record, "stages", None)
        if isinstance(stages, dict):
            for stage, seconds in stages.items():
                STAGE_SECONDS.labels(str(stage)).observe(float(seconds))


_pipeline_log = logging.getLogger("services.worker.pipeline")
_pipeline_log.addHandler(StageTimings(logging.INFO))
_pipeline_log.setLevel(logging.INFO)  # the batch line is made even when LOG_LEVEL hides it


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
        BATCHES.labels(state or "UNKNOWN").inc()
        BATCH_IMAGES.observe(len((kwargs or {}).get("items") or []))


@worker_init.connect  # type: ignore[untyped-decorator]
def _serve(**_: Any) -> None:
    """In the worker's main process: serve every pool child's series on WORKER_METRICS_PORT."""
    global _server
    settings = get_settings()
    if not settings.worker_metrics_port:
        return
    if values.ValueClass is values.MutexValue:
        log.warning("prometheus_client was imported early: pool children's series are not shared")
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
