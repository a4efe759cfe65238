"""Access: API keys (401 semantics), CORS, rate limits shared through Redis, idempotent uploads."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.stack import Stack
from shared.jobs import JobStore
from tests.conftest import free_port, running_stack, stack_settings, wait_for_job
from tests.images import encode, make_image

ORIGIN = "https://app.example"
KEYS = ["key-one", "key-two", "key-three"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tiny_upload(client: httpx.Client, key: str, **headers: str) -> httpx.Response:
    """A cheap upload (one file, refused at the door) that still makes a job."""
    return client.post(
        "/v1/jobs", files=[("files", ("t.jpg", b"x"))], headers={**bearer(key), **headers}
    )


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """A private stack with API keys, a CORS origin and tiny rate limits."""
    env = stack_settings(
        tmp_path_factory.mktemp("guarded"),
        tiny_model,
        API_KEYS=",".join(KEYS),
        CORS_ORIGINS=ORIGIN,
        RATE_LIMIT_UPLOADS="5/minute",
        RATE_LIMIT_SEARCHES="4/minute",
    )
    with running_stack(env) as stack:
        yield stack


@pytest.fixture(scope="module")
def gw(guarded: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.gateway_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def gw2(guarded: Stack) -> Iterator[httpx.Client]:
    """A second gateway process on the same Redis, with keys required on reads too."""
    port = free_port()
    env = {**guarded.env, "API_KEYS_ON_READS": "true"}
    argv = [sys.executable, "-m", "uvicorn", "services.gateway.main:app", "--port", str(port)]
    log = (guarded.log_dir / "gateway2.log").open("ab")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_missing_or_wrong_keys_are_401_with_a_challenge(gw: httpx.Client) -> None:
    files = [("files", ("a.jpg", encode(make_image(21000))))]
    cases = [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
        (bearer("nope"), "invalid_api_key"),
        (bearer("key-on"), "invalid_api_key"),  # a prefix of a real key
        (bearer("key-one-and-more"), "invalid_api_key"),
        ({"X-API-Key": "wrong"}, "invalid_api_key"),
    ]
    for headers, code in cases:
        response = gw.post("/v1/jobs", files=files, headers=headers)
        assert (response.status_code, response.json()["code"]) == (401, code), headers
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith("Bearer ")
        assert ('error="invalid_token"' in challenge) == (code == "invalid_api_key")
    assert gw.delete(f"/v1/jobs/{'a' * 32}").status_code == 401
    # Reads stay open unless API_KEYS_ON_READS is set; health is always open.
    assert gw.get("/v1/jobs").status_code == 200
    assert gw.get("/healthz").status_code == 200 and gw.get("/readyz").status_code == 200


def test_valid_keys_are_accepted_in_either_header(gw: httpx.Client) -> None:
    ok = gw.post(
        "/v1/jobs",
        files=[("files", ("b.jpg", encode(make_image(21001))))],
        headers={"Authorization": "bearer key-one"},  # the scheme is case-insensitive
    )
    assert ok.status_code == 202
    assert wait_for_job(gw, ok.json()["job_id"])["done"] == 1
    other = gw.post(
        "/v1/jobs", files=[("files", ("c.jpg", b"x"))], headers={"X-API-Key": "key-one"}
    )
    assert other.status_code == 202


def test_reads_need_a_key_when_configured(gw2: httpx.Client) -> None:
    missing = gw2.get("/v1/jobs")
    assert (missing.status_code, missing.json()["code"]) == (401, "missing_api_key")
    assert gw2.get("/v1/search", params={"q": "x"}).status_code == 401
    assert gw2.get("/metrics").status_code == 401
    assert gw2.get("/v1/jobs", headers=bearer("key-two")).status_code == 200
    assert gw2.get("/healthz").status_code == 200


def test_cors_allows_only_the_configured_origin(gw: httpx.Client, guarded: Stack) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, idempotency-key",
    }
    query = httpx.Client(base_url=guarded.query_url)
    for client in (gw, query):
        allowed = client.options("/v1/search", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "idempotency-key" in allowed.headers["access-control-allow-headers"].lower()
        refused = client.options("/v1/search", headers={**preflight, "Origin": "https://evil"})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
    query.close()
    # Errors carry the headers too, so a page can read their codes and Retry-After.
    error = gw.post("/v1/jobs", headers={"Origin": ORIGIN})
    assert error.status_code == 401 and error.headers["access-control-allow-origin"] == ORIGIN
    assert "retry-after" in error.headers["access-control-expose-headers"].lower()


def test_no_cors_headers_by_default(api: httpx.Client) -> None:
    response = api.get("/healthz", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers
    preflight = api.options(
        "/v1/search", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_search_limit_is_per_client_ip_and_per_key(gw: httpx.Client) -> None:
    for _ in range(4):
        assert gw.get("/v1/search", params={"q": "x"}).status_code == 200
    limited = gw.get("/v1/search", params={"q": "x"})
    assert limited.status_code == 429
    assert limited.json()["code"] == "rate_limited" and limited.json()["detail"]
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert gw.post("/v1/search", json={"text": "x"}).status_code == 429
    # A made-up key is not checked on an open read route, so it cannot dodge the IP's limit.
    assert gw.get("/v1/search", params={"q": "x"}, headers=bearer("made-up")).status_code == 429
    assert gw.get("/v1/search", params={"q": "x"}, headers=bearer("key-one")).status_code == 200


def test_upload_limit_is_shared_by_gateway_processes(gw: httpx.Client, gw2: httpx.Client) -> None:
    codes = [tiny_upload(c, "key-three").status_code for c in (gw, gw2, gw, gw2, gw)]
    assert codes == [202] * 5
    for client in (gw2, gw):
        refused = tiny_upload(client, "key-three")
        assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited")
        assert int(refused.headers["retry-after"]) >= 1
    assert tiny_upload(gw2, "key-two").status_code == 202  # another key: its own budget


def test_idempotency_keys_are_scoped_to_the_api_key(gw: httpx.Client) -> None:
    key = uuid.uuid4().hex
    first = tiny_upload(gw, "key-two", **{"Idempotency-Key": key}).json()["job_id"]
    again = tiny_upload(gw, "key-two", **{"Idempotency-Key": key})
    assert again.json()["job_id"] == first and again.headers["idempotent-replayed"] == "true"
    other = tiny_upload(gw, "key-one", **{"Idempotency-Key": key}).json()["job_id"]
    assert other != first


def test_idempotency_key_returns_the_original_job(api: httpx.Client) -> None:
    key = uuid.uuid4().hex
    files = [("i.jpg", encode(make_image(21010))), ("j.jpg", encode(make_image(21011)))]
    first = api.post(
        "/v1/jobs", files=[("files", f) for f in files], headers={"Idempotency-Key": key}
    )
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = api.post(
        "/v1/jobs", files=[("files", f) for f in files], headers={"Idempotency-Key": key}
    )
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert (again.json()["job_id"], again.json()["total"]) == (first.json()["job_id"], 2)
    listed = [j["job_id"] for j in api.get("/v1/jobs", params={"limit": 500}).json()["jobs"]]
    assert listed.count(first.json()["job_id"]) == 1
    assert wait_for_job(api, first.json()["job_id"])["done"] == 2


def test_idempotency_key_of_a_request_in_flight_is_409(api: httpx.Client, stack: Stack) -> None:
    key = uuid.uuid4().hex
    # The first request has claimed the key but not yet recorded its job.
    JobStore.from_settings(stack.settings).claim_idempotency_key(key, uuid.uuid4().hex)
    busy = api.post(
        "/v1/jobs",
        files=[("files", ("k.jpg", encode(make_image(21012))))],
        headers={"Idempotency-Key": key},
    )
    assert (busy.status_code, busy.json()["code"]) == (409, "idempotency_key_in_progress")
    assert busy.headers["retry-after"] == "1"


def test_failed_request_releases_its_idempotency_key(api: httpx.Client) -> None:
    key = uuid.uuid4().hex
    failed = api.post("/v1/jobs", data={"x": "1"}, headers={"Idempotency-Key": key})
    assert (failed.status_code, failed.json()["code"]) == (422, "no_files")
    retried = api.post(
        "/v1/jobs",
        files=[("files", ("r.jpg", encode(make_image(21013))))],
        headers={"Idempotency-Key": key},
    )
    assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers
    for bad in ["has space", "x" * 256, "caf\u00e9"]:
        response = api.post(
            "/v1/jobs",
            files=[("files", ("r.jpg", b"x"))],
            headers=[(b"Idempotency-Key", bad.encode())],
        )
        assert (response.status_code, response.json()["code"]) == (
            422,
            "invalid_idempotency_key",
        ), bad
