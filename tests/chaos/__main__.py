"""`python -m tests.chaos [--duration S] [--seed N] ...`: one run; exit 1 if anything is lost."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import threading
import time
from pathlib import Path
from typing import Any

from services.stack import Stack
from shared.settings import Settings
from tests.chaos import load, verify
from tests.conftest import stack_settings
from tests.support.tinymodel import build_tiny_clip


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    p.add_argument("--duration", type=float, default=180, help="seconds of load and kills")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--max-images", type=int, default=3000, help="stop uploading after this")
    p.add_argument("--job-min", type=int, default=4)
    p.add_argument("--job-max", type=int, default=24)
    p.add_argument("--upload-pause", type=float, default=1.0, help="mean seconds between jobs")
    p.add_argument("--upload-attempts", type=int, default=8, help="same Idempotency-Key")
    p.add_argument("--uploaders", type=int, default=2)
    p.add_argument("--searchers", type=int, default=2)
    p.add_argument("--worker-kills", type=int, default=3)
    p.add_argument("--redis-kills", type=int, default=3)
    p.add_argument("--milvus-kills", type=int, default=3)
    p.add_argument(
        "--redis-lose-s",
        type=float,
        default=0.0,
        help="restart Redis from its files as they were this many seconds before each kill",
    )
    p.add_argument("--cpu-hogs", type=int, default=2, help="busy-loop processes")
    p.add_argument("--drain-timeout", type=float, default=300)
    p.add_argument("--batch-size", type=int, default=4, help="EMBED_BATCH_SIZE")
    # FLAT: searches must equal brute force exactly. HNSW (the product default): a miss counts
    # only if an exhaustive search (ef = rows) misses too; the others are reported.
    p.add_argument("--index", choices=["FLAT", "HNSW"], default="FLAT", help="MILVUS_INDEX")
    p.add_argument("--out", type=Path, default=Path("data/chaos"))
    return p.parse_args(argv)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start a private stack, load it, kill its parts, drain, verify; the report."""
    out = args.out.resolve()
    model = out / "tiny-clip"
    if not (model / "config.json").exists():
        build_tiny_clip(model)
    data = out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    env = stack_settings(
        data,
        model,
        EMBED_BATCH_SIZE=str(args.batch_size),
        TASK_VISIBILITY_TIMEOUT_S="10",
        JOB_STALL_TIMEOUT_S="8",
        LOG_FORMAT="text",
        MILVUS_INDEX=args.index,
    )
    os.environ.update(env)  # the stack's children get it, now and on restarts
    stack = Stack(Settings())
    rng = random.Random(args.seed)
    hogs: list[Any] = []
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        started = time.monotonic()
        stack.up(timeout_s=180, workers=2)
        report["stack_up_s"] = round(time.monotonic() - started, 1)
        rec = load.Record(t0=time.monotonic())
        hogs = load.start_hogs(args.cpu_hogs, args.duration + args.drain_timeout + 60)
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=load.uploader,
                args=(rec, stack.gateway_url, stop, random.Random(rng.random()), args, b),
            )
            for b in range(args.seed * 10**8, args.seed * 10**8 + args.uploaders * 10**6, 10**6)
        ]
        threads += [
            threading.Thread(
                target=load.searcher, args=(rec, stack.gateway_url, stop, random.Random(i))
            )
            for i in range(args.searchers)
        ]
        threads.append(threading.Thread(target=load.monitor, args=(rec, stack.gateway_url, stop)))
        for t in threads:
            t.start()
        try:
            load.chaos(stack, rec, stop, random.Random(rng.random()), args)
            stop.wait(max(0.0, args.duration - (time.monotonic() - rec.t0)))
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        load_end = time.monotonic() - rec.t0
        stuck = verify.drain(rec, stack.gateway_url, args.drain_timeout)
        drained = time.monotonic() - rec.t0
        for hog in hogs:
            hog.kill()
        scan = verify.scan_logs(stack.log_dir)
        report["failed_searches_outside_outages"] = load.fill_recovery(rec, scan.pop("indexed_at"))
        rows = verify.all_rows(stack)
        report.update(
            summarise(rec, load_end, drained, stuck),
            jobs_check=verify.check_jobs(rec, stack),
            collection=verify.check_collection(rec, rows),
            search=verify.check_search(rec, stack, rows, model, k=10),
            admin_check=verify.admin_check(stack),
            logs=str(stack.log_dir),
            log_scan=scan,
        )
    finally:
        for hog in hogs:
            hog.kill()
        stack.down()
    report["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    report["ok"] = verdict(report)
    return report


def summarise(rec: load.Record, load_end: float, drained: float, stuck: list[str]) -> dict:
    statuses: dict[str, int] = {}
    for _, status in rec.searches:
        statuses[status] = statuses.get(status, 0) + 1
    kills = [dataclasses.asdict(k) for k in rec.kills]
    for k in kills:
        for name in ("answering_at", "search_ok_at", "progress_at"):
            k[name.replace("_at", "_after_restart_s")] = (
                round(k[name] - k["restarted_at"], 2) if k[name] else None
            )
    attempts: dict[int, int] = {}
    for job in rec.jobs.values():
        attempts[job.attempts] = attempts.get(job.attempts, 0) + 1
    return {
        "load_s": round(load_end, 1),
        "drained_s": round(drained, 1),
        "jobs": len(rec.jobs),
        "images_accepted": rec.accepted_images(),
        "jobs_by_upload_attempts": attempts,
        "uploads_given_up": len(rec.given_up),
        "upload_errors": rec.upload_errors,
        "searches": statuses,
        "jobs_vanished": rec.vanished,
        "counts_went_back": rec.went_back,
        "stuck": stuck,
        "kills": kills,
    }


def verdict(report: dict[str, Any]) -> bool:
    c = report.get("collection", {})
    return bool(
        c
        and not report["stuck"]
        and not report["jobs_vanished"]
        and not report["jobs_check"]["bad_counts"]
        and not report["jobs_check"]["bad_rows"]
        and not c["missing"]
        and not c["unknown"]
        and c["rows"] == c["distinct"]
        and not report["search"]["mismatches"]
        and not report["failed_searches_outside_outages"]
        and report["search"]["sample_min_cos"] > 0.99
        and report["admin_check"].get("clean") is True
    )


def print_summary(report: dict[str, Any], path: Path) -> None:
    c, j = report["collection"], report["jobs_check"]
    lines = [
        ("images accepted", report["images_accepted"]),
        ("rows in Milvus (distinct)", f"{c['rows']} ({c['distinct']})"),
        ("missing / unknown rows", f"{len(c['missing'])} / {len(c['unknown'])}"),
        (
            "refused uploads / their images indexed",
            f"{report['uploads_given_up']} / {len(c['refused_but_indexed'])}",
        ),
        (
            "jobs (bad counts, bad rows, stuck, vanished)",
            f"{report['jobs']} ({len(j['bad_counts'])}, {len(j['bad_rows'])}, "
            f"{len(report['stuck'])}, {len(report['jobs_vanished'])})",
        ),
        ("upload errors", report["upload_errors"]),
        ("job counts seen going back (Redis lost them)", len(report["counts_went_back"])),
        ("searches by status", report["searches"]),
        ("failed searches outside outages", report["failed_searches_outside_outages"]),
        (
            f"search vs brute force mismatches ({report['search']['index']}; approximate)",
            f"{len(report['search']['mismatches'])} of {report['search']['prompts']} "
            f"({len(report['search']['approximate_misses'])})",
        ),
        ("stored vs re-encoded min cosine", round(report["search"]["sample_min_cos"], 5)),
        (
            "sweeper resends (images)",
            f"{report['log_scan']['sweeper_resends']} "
            f"({report['log_scan']['sweeper_resent_images']})",
        ),
        (
            "admin check (bytes w/o vectors, vectors w/o bytes, stuck jobs)",
            "clean"
            if report["admin_check"].get("clean")
            else str(
                {
                    k: report["admin_check"].get(k)
                    for k in (
                        "bytes_without_vectors",
                        "vectors_without_bytes",
                        "stuck_jobs",
                        "error",
                    )
                }
            ),
        ),
        ("load / drained at (s)", f"{report['load_s']} / {report['drained_s']}"),
    ]
    for name, value in lines:
        print(f"{name:<45} {value}")
    print(
        f"{'kill':<8}{'target':<9}{'at s':>7}{'down s':>8}"
        f"{'answers':>9}{'search':>8}{'progress':>9}{'failed':>8}"
    )
    for k in report["kills"]:
        print(
            f"{k['kind']:<8}{k['target']:<9}{k['killed_at']:>7.1f}"
            f"{k['restarted_at'] - k['killed_at']:>8.1f}{k['answering_after_restart_s']!s:>9}"
            f"{k['search_ok_after_restart_s']!s:>8}{k['progress_after_restart_s']!s:>9}"
            f"{k['failed_searches']:>8}"
        )
    print(f"report: {path}   {'OK' if report['ok'] else 'LOST OR MISMATCHED: see the report'}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = run(args)
    path = args.out.resolve() / f"chaos-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print_summary(report, path)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
