"""Fixtures: a tiny CLIP checkpoint built here, and the real stack on free ports."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.stack import Stack
from shared.settings import Settings
from tests.support.tinymodel import build_tiny_clip

# Fixtures that start the whole stack (Redis, Milvus, query, worker, gateway): tests that use
# one are marked `stack`; `make unit` runs the others.
FULL_STACK = frozenset({"stack", "api", "rstack", "rapi", "neighbour"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if FULL_STACK & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random CLIPModel with the real CLIP tokenizer, saved with save_pretrained."""
    return build_tiny_clip(tmp_path_factory.mktemp("model") / "tiny-clip")


def stack_settings(data: Path, model: Path, **extra: str) -> dict[str, str]:
    """Environment for a private stack: its own Redis, Milvus Lite server, ports and data."""
    env = {
        "DATA_DIR": str(data),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MILVUS_URI": f"http://127.0.0.1:{free_port()}",
        "MILVUS_COLLECTION": "test_images",
        "GATEWAY_PORT": str(free_port()),
        "QUERY_PORT": str(free_port()),
        "CLIP_MODEL": str(model),
        "CLIP_DEVICE": "cpu",
        # Exact answers: the tests compare searches with float32 brute force. (auto would be
        # bfloat16 on CPUs with AVX512-BF16; the bench measures what that changes.)
        "CLIP_DTYPE": "float32",
        "EMBED_BATCH_SIZE": "16",
        "HF_HUB_OFFLINE": "1",
        # Many modules share one stack from one address; test_access.py tests the limits.
        "RATE_LIMIT_UPLOADS": "",
        "RATE_LIMIT_SEARCHES": "",
        "RATE_LIMIT_THUMBNAILS": "",
    }
    return {**env, **extra}


@contextmanager
def running_stack(env: dict[str, str], *, workers: int = 1) -> Iterator[Stack]:
    """Start a whole stack as real processes; stop everything it started afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        stack = Stack(Settings())  # children get this environment, now and on restarts
    try:
        stack.up(timeout_s=180, workers=workers)
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server of its own, for tests that need nothing else."""
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    proc = subprocess.Popen([*argv, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """The shared stack: Redis, Milvus Lite, query, one Celery worker, gateway."""
    env = stack_settings(tmp_path_factory.mktemp("data"), tiny_model)
    with running_stack(env) as running:
        yield running


@pytest.fixture(scope="session")
def api(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client on the gateway."""
    with httpx.Client(base_url=stack.gateway_url, timeout=60) as client:
        yield client


def wait_for_job(api: httpx.Client, job_id: str, *, timeout_s: float = 300) -> dict[str, Any]:
    """Poll a job until it reaches a final state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["state"] in {"succeeded", "completed_with_errors", "failed", "cancelled"}:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def upload(api: httpx.Client, files: list[tuple[str, bytes]], **data: str) -> httpx.Response:
    """POST /v1/jobs with the given (name, bytes) files."""
    return api.post("/v1/jobs", files=[("files", (n, b)) for n, b in files], data=data)


@pytest.fixture
def gateway_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A factory: the gateway app in-process (TestClient) on local blobs, no Redis or Milvus.

    Call it with environment settings (API_KEYS=..., GATEWAY_HOST=...); it returns the
    TestClient and the gateway state (blobs, thumbnail cache) the routes use.
    """
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from services.gateway import thumbnails
    from services.gateway.main import app
    from services.gateway.ratelimit import RateLimits
    from shared.blobs import BlobStore
    from shared.settings import get_settings

    def make(**env: str) -> tuple[TestClient, SimpleNamespace]:
        monkeypatch.setenv("DATA_DIR", str(tmp_path))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        settings = get_settings()

        class NoVectors:
            def exists(self) -> bool:
                return False

        gw = SimpleNamespace(
            settings=settings,
            blobs=BlobStore(settings.blob_dir),
            thumbs=thumbnails.ThumbnailCache(
                tmp_path / "thumbs", max_bytes=settings.thumbnail_cache_bytes
            ),
            rate_limits=RateLimits(redis_url=settings.redis_url, rules={}),
            vectors=NoVectors(),
            writes=None,
        )
        app.state.gw = gw
        return TestClient(app, raise_server_exceptions=False), gw

    yield make
    get_settings.cache_clear()
    if hasattr(app.state, "gw"):
        del app.state.gw


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Milvus Lite server on a free port, for store tests that need nothing else."""
    import signal
    import subprocess
    import sys

    from services.stack import _milvus_answers

    binary = Path(sys.executable).parent / "milvus-lite"
    if not binary.exists():
        pytest.skip("milvus-lite is not installed")
    port = free_port()
    data = tmp_path_factory.mktemp("milvus")
    argv = [str(binary), "server", "--data-dir", str(data), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--max-workers", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _milvus_answers(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("milvus-lite server did not start")
            time.sleep(0.2)
        yield uri
    finally:
        proc.send_signal(signal.SIGTERM)  # the architecture notes: stop it with SIGTERM
        proc.wait(timeout=30)
