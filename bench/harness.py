"""Shared bench plumbing: a private stack, timing, the results table."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from services.stack import Stack
from shared.settings import Settings

ROOT = Path(os.environ.get("BENCH_DIR", "data/bench")).resolve()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_stack(name: str, env: dict[str, str], *, fresh: bool = True) -> Iterator[Stack]:
    """A whole stack (own Redis, Milvus Lite server, ports, data) for one benchmark."""
    data = ROOT / "stacks" / name
    if fresh:  # an earlier run's rows would turn this run's images into duplicates
        shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    settings = {
        "DATA_DIR": str(data),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MILVUS_URI": f"http://127.0.0.1:{free_port()}",
        "MILVUS_COLLECTION": "bench_" + name.replace("-", "_"),
        "GATEWAY_PORT": str(free_port()),
        "QUERY_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
        # Measure the system, not the per-client rate limits (bench/load.py does the same).
        "RATE_LIMIT_UPLOADS": "",
        "RATE_LIMIT_SEARCHES": "",
        **env,
    }
    saved = dict(os.environ)
    os.environ.update(settings)
    os.environ.pop("QUERY_URL", None)
    try:
        stack = Stack(Settings())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        stack.up(timeout_s=600)
        yield stack
    finally:
        stack.down()


def run_job(client: httpx.Client, paths: list[Path], *, chunk: int = 10_000) -> dict[str, Any]:
    """Upload files as one job (first byte timed) and poll until it ends; adds `seconds`
    (to the end) and `accepted_seconds` (to the 202 answer)."""
    start = time.perf_counter()
    files = [("files", (p.name, p.read_bytes())) for p in paths[:chunk]]
    response = client.post("/v1/jobs", files=files)
    response.raise_for_status()
    accepted = time.perf_counter() - start
    job_id = response.json()["job_id"]
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "completed_with_errors", "failed", "cancelled"):
            job["seconds"] = time.perf_counter() - start
            job["accepted_seconds"] = accepted
            return job
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Table:
    """Rows of (measure, value, baseline, ratio, target) printed and saved together."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        measure: str,
        value: float,
        unit: str,
        *,
        baseline: float | None = None,
        baseline_name: str = "",
        target: str = "",
        ok: bool | None = None,
    ) -> None:
        ratio = value / baseline if baseline else None
        self.rows.append(
            {
                "measure": measure,
                "value": round(value, 4),
                "unit": unit,
                "baseline": baseline_name,
                "baseline_value": round(baseline, 2) if baseline else None,
                "ratio": round(ratio, 3) if ratio else None,
                "target": target,
                "ok": ok,
            }
        )
        print(self.format_row(self.rows[-1]), flush=True)

    @staticmethod
    def format_row(r: dict[str, Any]) -> str:
        base = f"{r['baseline']} {r['baseline_value']}" if r["baseline"] else ""
        ratio = f"{r['ratio']}x" if r["ratio"] is not None else ""
        ok = {True: "PASS", False: "MISS", None: ""}[r["ok"]]
        return (
            f"| {r['measure']} | {r['value']} {r['unit']} | {base} | {ratio} | "
            f"{r['target']} | {ok} |"
        )

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "rows": self.rows}, indent=2))
        print("\n| measure | value | baseline | ratio | target | |\n|---|---|---|---|---|---|")
        for r in self.rows:
            print(self.format_row(r))
        print(f"\nresults written to {path}")
