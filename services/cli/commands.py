"""`clipsearch jobs`, `job` and `search`: read the gateway and print tables, JSON or a grid."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from services.cli.client import CliError, Gateway
from services.cli.grid import make_grid

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
THUMB_SIZE = 150  # grid cell, px
FETCH_SIZE = 256  # a size the gateway serves (THUMBNAIL_SIZES), scaled into the cell here
ERRORS_SHOWN = 50


def _when(value: Any) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM:SS', or '-'."""
    return str(value)[:19].replace("T", " ") if value else "-"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def run_jobs(*, gateway: Gateway, limit: int, as_json: bool) -> int:
    """List recent jobs, newest first."""
    jobs = gateway.json("GET", "/v1/jobs", params={"limit": limit}).get("jobs", [])
    if as_json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print("no jobs yet")
        return 0
    header = ["JOB ID", "STATE", "TOTAL", "DONE", "DUP", "FAILED", "PROGRESS", "CREATED"]
    rows = [
        [
            str(j["job_id"]),
            str(j["state"]),
            str(j["total"]),
            str(j["done"]),
            str(j["duplicates"]),
            str(j["failed"]),
            f"{float(j.get('progress') or 0) * 100:.0f}%",
            _when(j.get("created_at")),
        ]
        for j in jobs
    ]
    print(_table(header, rows))
    return 0


def run_job(*, gateway: Gateway, job_id: str, as_json: bool) -> int:
    """Show one job: state, counters, times and per-item errors."""
    if not JOB_ID.match(job_id):
        raise CliError(f"not a job id: {job_id!r} (expected 32 hex characters)")
    job = gateway.json("GET", f"/v1/jobs/{job_id}")
    print(json.dumps(job, indent=2) if as_json else render_job(job))
    return 0


def render_job(job: dict[str, Any]) -> str:
    """A job as readable lines."""
    progress = float(job.get("progress") or 0) * 100
    lines = [
        f"job       {job['job_id']}",
        f"state     {job['state']} ({progress:.0f}%)",
        f"items     {job['total']} total: {job['done']} indexed, "
        f"{job['duplicates']} duplicates, {job['failed']} failed",
        f"created   {_when(job.get('created_at'))}",
        f"started   {_when(job.get('started_at'))}",
        f"finished  {_when(job.get('finished_at'))}",
    ]
    if job.get("eta_seconds") is not None:
        lines.append(f"eta       {job['eta_seconds']} s")
    errors = job.get("errors") or []
    if errors:
        lines.append(f"errors    {len(errors)}")
    for err in errors[:ERRORS_SHOWN]:
        lines.append(f"  {err.get('filename')}: {err.get('code')}: {err.get('detail')}")
    if len(errors) > ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - ERRORS_SHOWN} more (use --json)")
    return "\n".join(lines)


def search(
    *,
    gateway: Gateway,
    text: str | None,
    image: Path | None,
    k: int,
    min_score: float | None,
    job_id: str | None,
    tag: str | None,
) -> dict[str, Any]:
    """The gateway's answer to a text or image query, cut to k hits."""
    params: dict[str, Any] = {"k": k}
    if min_score is not None:
        params["min_score"] = min_score
    if image is not None:
        try:
            data = image.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {image}: {exc.strerror or exc}") from exc
        files = {"file": (image.name, data)}
        body = gateway.json("POST", "/v1/search/image", params=params, files=files)
    else:
        params.update({"q": text, "job_id": job_id, "tag": tag})
        params = {key: v for key, v in params.items() if v is not None}
        body = gateway.json("GET", "/v1/search", params=params)
    if not isinstance(body, dict) or not isinstance(body.get("hits"), list):
        raise CliError("the gateway's search answer has no hits list")
    body["hits"] = body["hits"][:k]
    if min_score is not None:  # the image route may not pass min_score on
        body["hits"] = [h for h in body["hits"] if h.get("score", 0) >= min_score]
    return body


def render_hits(*, gateway: Gateway, body: dict[str, Any]) -> str:
    """Rank, score, filename and URL of each hit, under a one-line header."""
    hits = body["hits"]
    head = f"{len(hits)} hits for {body.get('query')!r} in {body.get('took_ms')} ms"
    if not hits:
        return head
    rows = [
        [
            str(rank),
            f"{float(h['score']):.4f}",
            str(h.get("filename") or "-"),
            gateway.absolute(h["image_url"]),
        ]
        for rank, h in enumerate(hits, start=1)
    ]
    return head + "\n" + _table(["#", "SCORE", "FILENAME", "URL"], rows)


def write_grid(*, gateway: Gateway, body: dict[str, Any], path: Path) -> None:
    """Fetch each hit's thumbnail and save the result grid (150 px cells) to `path`."""
    cells = []
    for hit in body["hits"]:
        response = gateway.send_raw(
            "GET", f"{hit['image_url']}/thumbnail", params={"size": FETCH_SIZE}
        )
        data = response.content if response.is_success else b""
        cells.append((data, f"{float(hit['score']):.3f}\n{hit.get('filename') or '-'}"))
    grid = make_grid(str(body.get("query", "")), cells, columns=5, cell=THUMB_SIZE)
    try:
        grid.save(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot write the grid to {path}: {exc}") from exc


def run_search(
    *,
    gateway: Gateway,
    query: dict[str, Any],
    as_json: bool,
    grid: Path | None,
) -> int:
    """The search command: print hits (or JSON) and optionally write a grid image."""
    body = search(gateway=gateway, **query)
    print(json.dumps(body, indent=2) if as_json else render_hits(gateway=gateway, body=body))
    if grid is not None:
        write_grid(gateway=gateway, body=body, path=grid)
        print(f"wrote {grid}", file=sys.stderr)
    return 0


def run_admin_check(*, gateway: Gateway, repair: bool, as_json: bool) -> int:
    """Compare bytes, vectors and job records; exit 1 if drift is left unrepaired."""
    report = gateway.json("POST", "/v1/admin/check", json={"repair": repair})
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(render_check(report))
    return 0 if report["clean"] or repair else 1


def render_check(report: dict[str, Any]) -> str:
    """A check report as readable lines."""
    lines = [
        f"blobs {report['blobs']}, vectors {report['vectors']}, in flight {report['in_flight']}",
        f"bytes without vectors: {report['bytes_without_vectors']['count']}",
        f"vectors without bytes: {report['vectors_without_bytes']['count']}",
        f"stuck jobs: {len(report['stuck_jobs'])}",
    ]
    for job in report["stuck_jobs"]:
        lines.append(
            f"  {job['job_id']} {job['state']}, idle {job['idle_seconds']:.0f} s, "
            f"{job['uncounted_images']} images uncounted"
        )
    if report.get("repair_job_id"):
        lines.append(f"re-embedding in job {report['repair_job_id']}")
    if report.get("removed_vectors"):
        lines.append(f"removed {report['removed_vectors']} vectors without bytes")
    lines.append("clean" if report["clean"] else "drift found")
    return "\n".join(lines)
