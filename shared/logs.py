"""Logging for every service: one JSON object a line (LOG_FORMAT=json) or plain text."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

# The job a line is about, where the code in hand knows it (a worker batch, an upload).
JOB_ID: ContextVar[str | None] = ContextVar("job_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers uvicorn configures for itself; they are sent to the root handler instead.
UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")
_TASK_ARGS = frozenset({"args", "kwargs", "return_value"})


class _Context(logging.Filter):
    """Add the service, the job in hand and, on access lines, the request's parts."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        if getattr(record, "job_id", None) is None and (job_id := JOB_ID.get()):
            record.job_id = job_id
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            record.client, record.method, record.path, _, record.status = args
        record.__dict__.pop("color_message", None)  # uvicorn's copy for coloured terminals
        data = getattr(record, "data", None)
        if record.name.startswith("celery.") and isinstance(data, dict):
            # Celery attaches each task's arguments: a whole batch of filenames a line.
            record.data = {k: v for k, v in data.items() if k not in _TASK_ARGS}
        return True


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` installs (so a second call replaces it, not adds one)."""


def configure(service: str, *, fmt: str = "json", level: str | int = "INFO") -> None:
    """Send every log line of this process, uvicorn's included, to stderr in `fmt`."""
    handler = _Handler(sys.__stderr__ or sys.stderr)  # not a stream Celery may redirect
    handler.addFilter(_Context(service))
    handler.setLevel(level)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{levelname}{name}{message}",
                style="{",
                timestamp="time",
                rename_fields={"levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in UVICORN:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else a line per request at INFO
