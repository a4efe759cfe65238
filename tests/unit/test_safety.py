"""Insecure defaults: placeholder secrets refuse to start, open writes beyond loopback refused."""

from __future__ import annotations

from typing import Any

import pytest

from shared.safety import InsecureSettings, is_loopback, placeholder_secrets, refuse_placeholders
from shared.settings import Settings, get_settings

ID = "0" * 64
# Every variable a service reads a secret from, with a placeholder the repository ships.
PLACEHOLDERS = {
    "API_KEYS": "real-key-1,CHANGE_ME-api-key",
    "MILVUS_TOKEN": "CHANGE_ME",
    "S3_ACCESS_KEY": "minioadmin",
    "S3_SECRET_KEY": "minioadmin",
    "REDIS_URL": "redis://:CHANGE_ME-redis-password@redis:6379/0",
    "AWS_ACCESS_KEY_ID": "CHANGE_ME-access-key",
    "AWS_SECRET_ACCESS_KEY": "change_me-secret-key",
}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in (*PLACEHOLDERS, "ALLOW_INSECURE_DEFAULTS", "GATEWAY_HOST"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_a_placeholder_secret_refuses_to_start(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, PLACEHOLDERS[name])
    with pytest.raises(InsecureSettings) as info:
        get_settings()
    message = str(info.value)
    assert name in message and "ALLOW_INSECURE_DEFAULTS" in message
    assert "minioadmin" not in message.replace("minioadmin), ", "")  # never the value
    assert "CHANGE_ME-" not in message

    monkeypatch.setenv("ALLOW_INSECURE_DEFAULTS", "true")
    get_settings.cache_clear()
    assert get_settings().allow_insecure_defaults is True


def test_real_secrets_and_the_defaults_start(monkeypatch: pytest.MonkeyPatch) -> None:
    assert placeholder_secrets(Settings()) == []
    monkeypatch.setenv("API_KEYS", "k1-3f9a0c,k2-77ab")
    monkeypatch.setenv("S3_SECRET_KEY", "a-real-secret")
    monkeypatch.setenv("REDIS_URL", "redis://:s3cr3t@redis:6379/0")
    assert refuse_placeholders(Settings()).redis_url.startswith("redis://:s3cr3t@")


def test_loopback() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "gateway", "example.com"):
        assert not is_loopback(host), host


def test_gateway_beyond_loopback_refuses_writes_without_keys(gateway_app: Any) -> None:
    client, _ = gateway_app(GATEWAY_HOST="0.0.0.0")
    for method, path in (
        ("POST", "/v1/jobs"),
        ("DELETE", f"/v1/images/{ID}"),
        ("DELETE", f"/v1/jobs/{'0' * 32}"),
    ):
        answer = client.request(method, path)
        assert answer.status_code == 403, (method, path)
        body = answer.json()
        assert body["code"] == "writes_need_api_keys"
        assert "API_KEYS" in body["detail"] and "0.0.0.0" in body["detail"]
    # Reads stay open (health, images).
    assert client.get("/healthz").status_code == 200
    assert client.get(f"/v1/images/{ID}").status_code == 404


@pytest.mark.parametrize(
    "env",
    [
        {"GATEWAY_HOST": "127.0.0.1"},  # the default: only this machine can reach it
        {"GATEWAY_HOST": "0.0.0.0", "ALLOW_INSECURE_DEFAULTS": "true"},
    ],
)
def test_loopback_or_the_dev_flag_leaves_writes_open(gateway_app: Any, env: dict[str, str]) -> None:
    client, _ = gateway_app(**env)
    answer = client.delete(f"/v1/images/{ID}")
    assert answer.status_code == 404 and answer.json()["code"] == "image_not_found"


def test_with_keys_a_public_gateway_takes_keyed_writes(gateway_app: Any) -> None:
    client, _ = gateway_app(GATEWAY_HOST="0.0.0.0", API_KEYS="k-0123456789abcdef")
    assert client.delete(f"/v1/images/{ID}").json()["code"] == "missing_api_key"
    keyed = client.delete(
        f"/v1/images/{ID}", headers={"Authorization": "Bearer k-0123456789abcdef"}
    )
    assert keyed.status_code == 404


def test_an_undeclared_gateway_judges_by_the_address_a_request_reached(gateway_app: Any) -> None:
    """`uvicorn --host 0.0.0.0` by hand, GATEWAY_HOST left unset: a LAN client cannot write."""
    from fastapi.testclient import TestClient

    from services.gateway.main import app

    gateway_app()  # GATEWAY_HOST not set
    lan = TestClient(app, base_url="http://192.168.1.20:8000")
    answer = lan.delete(f"/v1/images/{ID}")
    assert answer.status_code == 403
    assert answer.json()["code"] == "writes_need_api_keys"
    assert "192.168.1.20" in answer.json()["detail"]
    local = TestClient(app, base_url="http://127.0.0.1:8000")
    assert local.delete(f"/v1/images/{ID}").json()["code"] == "image_not_found"

    # Declared (compose publishes on the host's loopback; connections arrive on eth0): trusted.
    gateway_app(GATEWAY_HOST="127.0.0.1")
    lan = TestClient(app, base_url="http://172.18.0.5:8000")
    assert lan.delete(f"/v1/images/{ID}").json()["code"] == "image_not_found"
