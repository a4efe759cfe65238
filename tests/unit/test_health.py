"""The shared health router in process: alive always, ready only when every probe passes."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.blobs import BlobStore
from shared.web.health import health_router
from shared.web.http import install_error_handlers


def app_with(**probes: object) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    def broken() -> None:
        raise ConnectionError("refused")

    table = {name: (broken if ok is False else (lambda: None)) for name, ok in probes.items()}
    app.include_router(health_router(lambda _: table, model=lambda _: "tiny"))
    return TestClient(app)


def test_ready_when_every_probe_passes() -> None:
    client = app_with(redis=True, milvus=True)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"redis": "ok", "milvus": "ok"},
        "model": "tiny",
    }


def test_not_ready_names_the_failing_dependency() -> None:
    client = app_with(redis=True, milvus=False)
    ready = client.get("/readyz")
    body = ready.json()
    assert (ready.status_code, body["code"]) == (503, "not_ready")
    assert body["checks"] == {"redis": "ok", "milvus": "error: ConnectionError: refused"}
    assert "milvus" in body["detail"] and "redis" not in body["detail"]
    assert client.get("/healthz").status_code == 200


def test_the_blob_store_probe_fails_when_its_directory_is_gone(tmp_path) -> None:
    store = BlobStore(tmp_path / "blobs")
    assert store.ping()
    (tmp_path / "blobs").rmdir()
    with pytest.raises(OSError, match="not a writable directory"):
        store.ping()
