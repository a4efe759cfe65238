"""`clipsearch ingest`: skip what is indexed, upload the rest in chunks, follow the jobs."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from services.cli.client import CliError, Gateway, error_message
from services.cli.files import Scanned, Source, collect, scan

FINAL_STATES = frozenset({"succeeded", "completed_with_errors", "failed", "cancelled"})
LOOKUP_MAX = 10_000
POLL_S = 0.5
POLL_GRACE_S = 30.0
UPLOAD_ATTEMPTS = 3
ERRORS_SHOWN = 20
FATAL_CODES = frozenset({"missing_api_key", "invalid_api_key", "invalid_metadata"})


@dataclass
class Plan:
    """What to send and what not to, decided before anything is uploaded."""

    uploads: list[Source] = field(default_factory=list)
    skipped: list[Source] = field(default_factory=list)
    duplicates: list[Source] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Report:
    """Everything an ingest did, summed over its jobs."""

    files: int = 0
    skipped: int = 0
    uploaded: int = 0
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    local_errors: list[dict[str, str]] = field(default_factory=list)
    local_duplicates: int = 0

    def count(self, key: str) -> int:
        """A job counter summed over every job."""
        return sum(int(job.get(key, 0)) for job in self.jobs.values())

    def unprocessed(self) -> int:
        """Items of cancelled jobs that never ran."""
        return sum(
            job["total"] - job["done"] - job["failed"] - job["duplicates"]
            for job in self.jobs.values()
            if job.get("state") == "cancelled"
        )

    def errors(self) -> list[dict[str, str]]:
        """Per-item errors: local ones, then each job's (which include those rejected at upload)."""
        out = list(self.local_errors)
        for job in self.jobs.values():
            out.extend(job.get("errors") or [])
        return out

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        return {
            "files": self.files,
            "skipped": self.skipped,
            "uploaded": self.uploaded,
            "indexed": self.count("done"),
            "duplicates": self.count("duplicates") + self.local_duplicates,
            "failed": self.count("failed") + len(self.local_errors) + self.unprocessed(),
            "rejected_at_upload": len(self.rejected),
            "jobs": {job_id: job.get("state") for job_id, job in self.jobs.items()},
            "errors": self.errors(),
        }


class _CountingFile(io.FileIO):
    """A file whose reads advance a progress callback (how httpx streams a multipart body)."""

    def __init__(self, path: Path, *, tick: Callable[[int], None]) -> None:
        super().__init__(path, "rb")
        self._tick = tick

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self._tick(len(data or b""))
        return data


def _bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    return tqdm(file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)


def _note(message: str) -> None:
    """A progress note on stderr."""
    print(message, file=sys.stderr)


def parse_metadata(*, raw: str | None, tags: list[str]) -> dict[str, Any]:
    """--metadata as a JSON object, with --tag values added to its 'tags' list."""
    metadata: Any = {}
    if raw:
        try:
            metadata = json.loads(raw)
        except ValueError as exc:
            raise CliError(f"--metadata is not valid JSON: {exc}") from exc
        if not isinstance(metadata, dict):
            raise CliError('--metadata must be a JSON object, e.g. \'{"album": "2024"}\'')
    if tags:
        existing = metadata.get("tags", [])
        if not isinstance(existing, list):
            existing = [existing]
        metadata["tags"] = list(dict.fromkeys([*existing, *tags]))
    return dict(metadata)


def plan(*, gateway: Gateway, sources: list[Source]) -> Plan:
    """Hash every source, drop repeats within this run and what the gateway already indexed."""
    result = Plan()
    unique: list[Scanned] = []
    repeats: list[Scanned] = []
    digests: set[str] = set()
    with _bar(total=len(sources), desc="hashing", unit="file", leave=False) as bar:
        for source in sources:
            bar.update(1)
            try:
                scanned = scan(source)
            except OSError as exc:
                detail = exc.strerror or str(exc)
                result.unreadable.append(
                    {"filename": source.name, "code": "unreadable", "detail": detail}
                )
                continue
            repeat = scanned.digest in digests
            digests.add(scanned.digest)
            (repeats if repeat else unique).append(scanned)
    indexed = lookup(gateway=gateway, image_ids=[i for s in unique for i in s.image_ids or ()])
    for scanned, repeat in [(s, False) for s in unique] + [(s, True) for s in repeats]:
        ids = scanned.image_ids
        if ids is not None and all(i in indexed for i in ids):
            result.skipped.append(scanned.source)
        else:
            (result.duplicates if repeat else result.uploads).append(scanned.source)
    return result


def lookup(*, gateway: Gateway, image_ids: list[str]) -> set[str]:
    """Which of these image ids the gateway has indexed, asked in batches of 10,000."""
    unique = list(dict.fromkeys(image_ids))
    indexed: set[str] = set()
    for start in range(0, len(unique), LOOKUP_MAX):
        body = gateway.json(
            "POST", "/v1/images/lookup", json={"image_ids": unique[start : start + LOOKUP_MAX]}
        )
        indexed.update(body.get("indexed", []))
    return indexed


def chunks(sources: list[Source], *, max_files: int, max_bytes: int) -> Iterator[list[Source]]:
    """Consecutive groups of at most `max_files` files and (unless one file is bigger) bytes."""
    group: list[Source] = []
    size = 0
    for source in sources:
        if group and (len(group) >= max_files or size + source.size > max_bytes):
            yield group
            group, size = [], 0
        group.append(source)
        size += source.size
    if group:
        yield group


def upload_chunk(
    *, gateway: Gateway, chunk: list[Source], metadata: dict[str, Any], bar: Any
) -> httpx.Response:
    """POST one chunk as a job, retrying a lost connection (same Idempotency-Key) or a 503."""
    data = {"metadata": json.dumps(metadata)} if metadata else {}
    key = uuid.uuid4().hex
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        sent = [0]

        def tick(n: int, sent: list[int] = sent) -> None:
            sent[0] += n
            bar.update(n)

        try:
            response = _post_files(gateway=gateway, chunk=chunk, data=data, key=key, tick=tick)
        except CliError:
            bar.update(-sent[0])
            if attempt == UPLOAD_ATTEMPTS:
                raise
        else:
            if response.status_code != 503 or attempt == UPLOAD_ATTEMPTS:
                return response
            bar.update(-sent[0])
            key = uuid.uuid4().hex  # the gateway said it did not take the job
        time.sleep(attempt)
    raise AssertionError("unreachable")


def _post_files(
    *,
    gateway: Gateway,
    chunk: list[Source],
    data: dict[str, str],
    key: str,
    tick: Callable[[int], None],
) -> httpx.Response:
    """One multipart POST /v1/jobs with the chunk's files streamed from disk."""
    with contextlib.ExitStack() as stack:
        files = [
            ("files", (s.name, stack.enter_context(_CountingFile(s.path, tick=tick))))
            for s in chunk
        ]
        return gateway.send_raw(
            "POST", "/v1/jobs", files=files, data=data, headers={"Idempotency-Key": key}
        )


def record_upload(*, report: Report, chunk: list[Source], response: httpx.Response) -> None:
    """Note a chunk's job, or each of its files as rejected when the whole request was refused."""
    body: Any = None
    with contextlib.suppress(ValueError):
        body = response.json()
    if response.is_success and isinstance(body, dict) and "job_id" in body:
        rejected = list(body.get("rejected") or [])
        report.jobs[body["job_id"]] = {
            "state": "queued",
            "total": body.get("total", 0),
            "done": 0,
            "failed": len(rejected),  # the gateway counts these as failed at once
            "duplicates": 0,
            "errors": rejected,
        }
        report.rejected.extend(rejected)
        return
    code = body.get("code") if isinstance(body, dict) else None
    if response.status_code in (401, 403) or code in FATAL_CODES:
        raise CliError(error_message(response))
    detail = error_message(response)
    for source in chunk:
        entry = {"filename": source.name, "code": code or "upload_failed", "detail": detail}
        report.rejected.append(entry)
        report.local_errors.append(entry)


def upload_all(
    *, gateway: Gateway, sources: list[Source], metadata: dict[str, Any], limits: tuple[int, int]
) -> Report:
    """Upload every source in chunks; one job per chunk."""
    report = Report()
    total = sum(s.size for s in sources)
    with _bar(total=total, desc="upload", unit="B", unit_scale=True, unit_divisor=1024) as bar:
        for chunk in chunks(sources, max_files=limits[0], max_bytes=limits[1]):
            response = upload_chunk(gateway=gateway, chunk=chunk, metadata=metadata, bar=bar)
            record_upload(report=report, chunk=chunk, response=response)
            report.uploaded += len(chunk)
    return report


def follow(*, gateway: Gateway, report: Report) -> None:
    """Poll every job each half second until all are final, with one bar for all of them."""
    total = sum(int(job["total"]) for job in report.jobs.values())
    last_ok = time.monotonic()
    with _bar(total=total, desc="embed", unit="img") as bar:
        while True:
            pending = [j for j, job in report.jobs.items() if job["state"] not in FINAL_STATES]
            if not pending:
                break
            try:
                for job_id in pending:
                    report.jobs[job_id] = gateway.json("GET", f"/v1/jobs/{job_id}")
                last_ok = time.monotonic()
            except CliError:
                if time.monotonic() - last_ok > POLL_GRACE_S:
                    raise
            processed = report.count("done") + report.count("failed") + report.count("duplicates")
            bar.update(processed - bar.n)
            if any(job["state"] not in FINAL_STATES for job in report.jobs.values()):
                time.sleep(POLL_S)


def render(report: Report) -> str:
    """The human summary printed at the end."""
    s = report.as_dict()
    lines = [
        f"indexed:     {s['indexed']}",
        f"duplicates:  {s['duplicates']}",
        f"failed:      {s['failed']}",
    ]
    errors = s["errors"]
    for err in errors[:ERRORS_SHOWN]:
        lines.append(f"  {err.get('filename')}: {err.get('code')}: {err.get('detail')}")
    if len(errors) > ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - ERRORS_SHOWN} more (see `clipsearch job ID`)")
    lines.append(f"rejected at upload: {s['rejected_at_upload']}")
    lines.append(f"skipped (already indexed): {s['skipped']}")
    states = Counter(s["jobs"].values())
    counts = ", ".join(f"{n} {state}" for state, n in states.most_common())
    lines.append(f"jobs:        {len(s['jobs'])}" + (f" ({counts})" if counts else ""))
    unhappy = [(j, state) for j, state in s["jobs"].items() if state != "succeeded"]
    lines.extend(f"  {job_id} {state}" for job_id, state in unhappy[:ERRORS_SHOWN])
    return "\n".join(lines)


def exit_code(report: Report) -> int:
    """0 when nothing failed, 1 when some items failed or a job did not finish."""
    s = report.as_dict()
    bad_state = any(state in ("failed", "cancelled") for state in s["jobs"].values())
    return 1 if s["failed"] or s["rejected_at_upload"] or bad_state else 0


def run_ingest(
    *,
    gateway: Gateway,
    paths: list[str],
    metadata: dict[str, Any],
    limits: tuple[int, int],
    wait: bool,
    as_json: bool,
) -> int:
    """The whole ingest command; returns its exit code."""
    sources = collect(paths)
    if not sources:
        raise CliError("no image or archive files found in " + " ".join(paths))
    planned = plan(gateway=gateway, sources=sources)
    if planned.skipped:
        _note(f"skipped {len(planned.skipped)} file(s) already indexed")
    if not planned.uploads:
        _note("nothing to upload")
    report = upload_all(gateway=gateway, sources=planned.uploads, metadata=metadata, limits=limits)
    report.files, report.skipped = len(sources), len(planned.skipped)
    report.local_duplicates = len(planned.duplicates)
    report.local_errors[:0] = planned.unreadable
    if wait:
        follow(gateway=gateway, report=report)
    else:
        _note("not waiting; follow with: " + "; ".join(f"clipsearch job {j}" for j in report.jobs))
    print(json.dumps(report.as_dict(), indent=2) if as_json else render(report))
    return exit_code(report)
