"""The load of a chaos run: uploaders, searchers, a job monitor, CPU hogs and the kills."""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.stack import Stack, _milvus_answers, _redis_answers
from tests.images import encode, make_image

FINAL = {"succeeded", "completed_with_errors", "failed", "cancelled"}
PROMPTS = ["a red car", "a white dog on a beach", "sunset over the sea", "a bowl of fruit", "x"]


@dataclass
class Job:
    """One upload the gateway accepted (202), and what it holds."""

    job_id: str
    images: dict[str, int]  # image_id -> make_image seed
    accepted_at: float
    attempts: int
    last: dict[str, Any] = field(default_factory=dict)  # the latest GET /v1/jobs/{id}


@dataclass
class Kill:
    """One SIGKILL and restart."""

    kind: str
    target: str
    killed_at: float
    restarted_at: float = 0.0
    answering_at: float = 0.0  # the restarted process answers (ping / port)
    search_ok_at: float = 0.0  # first 200 search after the restart
    progress_at: float = 0.0  # first batch a worker indexed after the restart (its log)
    rolled_back_s: float = 0.0  # Redis restarted from its files as they were this long before
    failed_searches: int = 0  # non-200 answers from the kill to the first 200 after restart


@dataclass
class Record:
    """Everything the threads saw, under one lock."""

    t0: float
    t0_wall: float = field(default_factory=time.time)  # the same moment, for log timestamps
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: dict[str, Job] = field(default_factory=dict)
    given_up: list[dict[str, Any]] = field(default_factory=list)  # uploads never accepted
    upload_errors: dict[str, int] = field(default_factory=dict)  # status or exception -> n
    searches: list[tuple[float, str]] = field(default_factory=list)  # (time, status)
    vanished: dict[str, float] = field(default_factory=dict)  # job id -> first 404 after 202
    # (time, job id, counted before, counted now): a job's counts went back (Redis lost them)
    went_back: list[tuple[float, str, int, int]] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # image ids handed out
    next_seed: int = 0

    def count(self, table: dict[str, int], key: str) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1

    def accepted_images(self) -> int:
        with self.lock:
            return sum(len(j.images) for j in self.jobs.values())


def new_images(rec: Record, rng: random.Random, n: int, base: int) -> list[tuple[str, bytes, int]]:
    """n distinct images (filename, bytes, seed) never handed out before in this run."""
    out: list[tuple[str, bytes, int]] = []
    while len(out) < n:
        with rec.lock:
            seed = base + rec.next_seed
            rec.next_seed += 1
        data = encode(make_image(seed))
        image_id = hashlib.sha256(data).hexdigest()
        with rec.lock:
            if image_id in rec.used:
                continue
            rec.used.add(image_id)
        out.append((f"c{seed}.jpg", data, seed))
    return out


def uploader(
    rec: Record, url: str, stop: threading.Event, rng: random.Random, args: Any, base: int
) -> None:
    """Post jobs of fresh images; retry a refused one with the same Idempotency-Key."""
    with httpx.Client(base_url=url, timeout=30) as api:
        while not stop.is_set() and rec.accepted_images() < args.max_images:
            images = new_images(rec, rng, rng.randint(args.job_min, args.job_max), base)
            files = [("files", (name, data)) for name, data, _ in images]
            key = uuid.UUID(int=rng.getrandbits(128)).hex
            for attempt in range(1, args.upload_attempts + 1):
                try:
                    r = api.post("/v1/jobs", files=files, headers={"Idempotency-Key": key})
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    r, status = None, type(exc).__name__
                if r is not None and r.status_code == 202:
                    body = r.json()
                    assert body["total"] == len(images) and not body["rejected"], body
                    ids = {hashlib.sha256(d).hexdigest(): s for _, d, s in images}
                    job = Job(body["job_id"], ids, time.monotonic() - rec.t0, attempt)
                    with rec.lock:
                        rec.jobs[job.job_id] = job
                    break
                rec.count(rec.upload_errors, status)
                if stop.wait(min(0.5 * attempt, 3)):
                    break
            else:
                ids = {hashlib.sha256(d).hexdigest(): s for _, d, s in images}
                with rec.lock:
                    rec.given_up.append({"key": key, "images": ids})
            stop.wait(rng.uniform(args.upload_pause / 2, args.upload_pause * 1.5))


def searcher(rec: Record, url: str, stop: threading.Event, rng: random.Random) -> None:
    """Search continuously; record each answer's status."""
    with httpx.Client(base_url=url, timeout=30) as api:
        while not stop.is_set():
            try:
                r = api.get("/v1/search", params={"q": rng.choice(PROMPTS), "k": 10})
                status = str(r.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with rec.lock:
                rec.searches.append((time.monotonic() - rec.t0, status))
            stop.wait(rng.uniform(0.05, 0.3))


def monitor(rec: Record, url: str, stop: threading.Event) -> None:
    """Poll unfinished jobs; note counts that go back and job ids that stop being known."""
    with httpx.Client(base_url=url, timeout=10) as api:
        while not stop.wait(0.4):
            with rec.lock:
                open_jobs = [j for j in rec.jobs.values() if j.last.get("state") not in FINAL]
            for job in open_jobs:
                try:
                    r = api.get(f"/v1/jobs/{job.job_id}")
                except httpx.HTTPError:
                    continue
                now = time.monotonic() - rec.t0
                if r.status_code == 404:
                    with rec.lock:
                        rec.vanished.setdefault(job.job_id, now)
                if r.status_code != 200:
                    continue
                body = r.json()
                with rec.lock:
                    if _counted(body) < _counted(job.last):
                        rec.went_back.append((now, job.job_id, _counted(job.last), _counted(body)))
                    job.last = body


def _counted(job: dict[str, Any]) -> int:
    return int(job.get("done", 0)) + int(job.get("failed", 0)) + int(job.get("duplicates", 0))


def _burn(until: float) -> None:
    x = 0
    while time.time() < until:
        x = (x * 31 + 7) % 1_000_003


def start_hogs(n: int, seconds: float) -> list[Any]:
    """n busy-loop processes that end by themselves after `seconds` (and are killed at the end)."""
    ctx = multiprocessing.get_context("spawn")
    hogs = [ctx.Process(target=_burn, args=(time.time() + seconds,), daemon=True) for _ in range(n)]
    for hog in hogs:
        hog.start()
    return hogs


def _wait_for(probe: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.1)
    return False


def kill_and_restart(
    stack: Stack, rec: Record, kind: str, rng: random.Random, *, target: str, lose_s: float = 0.0
) -> Kill:
    """SIGKILL one part (a whole worker, Redis or the Milvus Lite server) and start it again.

    A SIGKILLed Redis keeps every write it acknowledged (its append-only file is written
    before it replies; only fsync waits a second, which matters when the machine dies). With
    `lose_s`, Redis comes back from a copy of its files taken `lose_s` earlier instead: the
    writes of those last seconds are lost, as in a power cut.
    """
    s = stack.settings
    aof, copy = stack.data / "redis" / "appendonlydir", stack.data / "redis-copy"
    rollback = kind == "redis" and lose_s > 0
    if rollback:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(aof, copy)
        time.sleep(lose_s)
    kill = Kill(kind, target, time.monotonic() - rec.t0, rolled_back_s=lose_s if rollback else 0)
    stack.stop(target, sig=signal.SIGKILL)
    if rollback:
        shutil.rmtree(aof)
        shutil.copytree(copy, aof)
    time.sleep(rng.uniform(0.5, 3.0))  # down for a moment: clients see the outage
    if kind == "worker":
        stack.start_worker(target)
    else:
        stack.restart(target)
    kill.restarted_at = time.monotonic() - rec.t0
    probes = {
        "redis": lambda: _redis_answers(s.redis_url),
        "milvus": lambda: _milvus_answers(s.milvus_uri),
        "worker": lambda: True,
    }
    if _wait_for(probes[kind], 60):
        kill.answering_at = time.monotonic() - rec.t0
    with rec.lock:
        rec.kills.append(kill)
    return kill


def chaos(stack: Stack, rec: Record, stop: threading.Event, rng: random.Random, args: Any) -> None:
    """The kills, shuffled, at random moments spread over the run."""
    kinds = ["worker"] * args.worker_kills + ["redis"] * args.redis_kills
    kinds += ["milvus"] * args.milvus_kills
    rng.shuffle(kinds)
    workers = rng.sample(["worker1", "worker2"], 2)  # then each in turn: both get killed
    slot = args.duration / (len(kinds) + 1)
    for i, kind in enumerate(kinds):
        at = slot * (i + 0.5) + rng.uniform(0, slot)
        if stop.wait(max(0.0, at - (time.monotonic() - rec.t0))):
            return
        target = kind
        if kind == "worker":
            target = workers[0]
            workers.reverse()
        kill_and_restart(stack, rec, kind, rng, target=target, lose_s=args.redis_lose_s)


def fill_recovery(rec: Record, indexed: list[float]) -> int:
    """For each kill, the first successful search and the first job progress after restart,
    and the searches that failed in between; the failed searches outside every such window."""
    ok = sorted(t for t, status in rec.searches if status == "200")
    progress = sorted(t - rec.t0_wall for t in indexed)
    failed = [t for t, status in rec.searches if status != "200"]
    explained: set[float] = set()
    for kill in rec.kills:
        kill.search_ok_at = next((t for t in ok if t >= kill.restarted_at), 0.0)
        kill.progress_at = next((t for t in progress if t >= kill.restarted_at), 0.0)
        end = kill.search_ok_at or float("inf")
        window = [t for t in failed if kill.killed_at <= t <= end]
        kill.failed_searches = len(window)
        explained.update(window)
    return sum(1 for t in failed if t not in explained)
