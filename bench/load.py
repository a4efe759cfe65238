"""Load test against a running stack: concurrent searches and bulk uploads, then an audit.

    python -m bench.load http://127.0.0.1:8000      # 50 searchers, 5 uploaders, 60 s
    python -m bench.load URL --duration 15 --clients 10 --uploaders 2    # a short run
    python -m bench.load URL --api-key KEY --json load.json

Reports requests by status, p50/p90/p99 latency per kind, and audits every job it made: each
uploaded image must be counted in its job (done, failed or duplicate) once the job ends. Exits
non-zero on any 5xx, connection error or lost image. Rate limits apply to this client like any
other (429s are counted, not failures): run it against a stack with RATE_LIMIT_* off, or a key.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

QUERIES = [
    "a white dog on a beach",
    "red circles on a blue background",
    "a green square",
    "sunset over the sea",
    "a yellow shape",
    "dark picture with a bright spot",
    "many colourful rectangles",
    "a purple ellipse",
]
FINAL = {"succeeded", "completed_with_errors", "failed", "cancelled"}


@dataclass
class Stats:
    """Latencies and statuses per kind of request, and the jobs made."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)  # job_id -> images sent

    def add(self, kind: str, seconds: float, status: str) -> None:
        self.latencies.setdefault(kind, []).append(seconds)
        self.statuses.setdefault(kind, Counter())[status] += 1


def picture(seed: int, size: tuple[int, int]) -> bytes:
    """A distinct JPEG for `seed`: colour fields and shapes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        box = (x0, y0, x0 + int(rng.integers(8, 80)), y0 + int(rng.integers(8, 80)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


async def timed(
    stats: Stats, kind: str, call: Any, *args: Any, **kwargs: Any
) -> httpx.Response | None:
    start = time.perf_counter()
    try:
        response: httpx.Response = await call(*args, **kwargs)
    except httpx.HTTPError as exc:
        stats.add(kind, time.perf_counter() - start, f"error:{exc.__class__.__name__}")
        return None
    stats.add(kind, time.perf_counter() - start, str(response.status_code))
    return response


async def searcher(client: httpx.AsyncClient, stats: Stats, deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        params = {"q": rng.choice(QUERIES), "k": rng.choice([5, 10, 20])}
        await timed(stats, "search", client.get, "/v1/search", params=params)


async def uploader(
    client: httpx.AsyncClient, stats: Stats, deadline: float, args: argparse.Namespace, first: int
) -> None:
    seed = first
    while time.monotonic() < deadline:
        seeds = range(seed, seed + args.images_per_upload)
        seed += args.images_per_upload
        files = await asyncio.to_thread(_files, seeds, args.size)
        response = await timed(stats, "upload", client.post, "/v1/jobs", files=files)
        if response is not None and response.status_code == 202:
            stats.jobs[response.json()["job_id"]] = len(files)
        await asyncio.sleep(args.upload_interval)


def _files(seeds: range, size: tuple[int, int]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f"load{s}.jpg", picture(s, size))) for s in seeds]


async def audit(client: httpx.AsyncClient, stats: Stats, settle_s: float) -> dict[str, int]:
    """Wait for every job to end; count images accounted for, and any not."""
    deadline = time.monotonic() + settle_s
    pending = dict(stats.jobs)
    totals: Counter[str] = Counter()
    while pending and time.monotonic() < deadline:
        for job_id, sent in list(pending.items()):
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["state"] not in FINAL:
                continue
            del pending[job_id]
            counted = job["done"] + job["failed"] + job["duplicates"]
            totals["images_sent"] += sent
            totals["done"] += job["done"]
            totals["failed"] += job["failed"]
            totals["duplicates"] += job["duplicates"]
            totals["lost"] += sent - counted if job["total"] == sent else sent
        if pending:
            await asyncio.sleep(1)
    totals["jobs"] = len(stats.jobs)
    totals["jobs_unfinished"] = len(pending)
    totals["images_sent"] += sum(pending.values())
    return dict(totals)


def summary(stats: Stats, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, values in stats.latencies.items():
        ms = np.asarray(values) * 1000
        out[kind] = {
            "requests": len(values),
            "per_second": round(len(values) / seconds, 1),
            "statuses": dict(stats.statuses[kind]),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1),
        }
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + args.uploaders + 4)
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=120, limits=limits
    ) as client:
        (await client.get("/readyz")).raise_for_status()
        stats = Stats()
        start = time.monotonic()
        deadline = start + args.duration
        first = random.randrange(10**9)  # images new to the index on every run
        workers = [searcher(client, stats, deadline, i) for i in range(args.clients)]
        workers += [
            uploader(client, stats, deadline, args, first + i * 10**6)
            for i in range(args.uploaders)
        ]
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - start
        accounted = await audit(client, stats, args.settle)
    result = {"url": args.url, "seconds": round(elapsed, 1), "clients": args.clients}
    result["uploaders"] = args.uploaders
    result.update(summary(stats, elapsed))
    result["audit"] = accounted
    statuses = Counter[str]()
    for counter in stats.statuses.values():
        statuses.update(counter)
    result["server_errors"] = sum(n for s, n in statuses.items() if s.startswith("5"))
    result["connection_errors"] = sum(n for s, n in statuses.items() if s.startswith("error"))
    result["rate_limited"] = statuses.get("429", 0)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("url", help="the gateway, e.g. http://127.0.0.1:8000")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (60)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent searchers (50)")
    parser.add_argument("--uploaders", type=int, default=5, help="concurrent uploaders (5)")
    parser.add_argument("--images-per-upload", type=int, default=16)
    parser.add_argument("--upload-interval", type=float, default=1.0, help="pause per uploader")
    parser.add_argument("--size", type=lambda v: tuple(map(int, v.split("x"))), default=(320, 240))
    parser.add_argument("--settle", type=float, default=600, help="most seconds to await jobs")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    audit_ = result["audit"]
    ok = (
        result["server_errors"] == 0
        and result["connection_errors"] == 0
        and audit_.get("lost", 0) == 0
        and audit_.get("jobs_unfinished", 0) == 0
    )
    print(
        "OK: no 5xx, nothing lost" if ok else "FAILED: see server_errors / audit", file=sys.stderr
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
