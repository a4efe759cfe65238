"""API keys: required on write routes when API_KEYS is set, optionally on reads."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from shared.errors import Forbidden, Unauthorized
from shared.safety import open_writes_exposed
from shared.settings import get_settings

OPEN_WRITES_REFUSED = (
    "writes are refused: this gateway is reachable beyond loopback (GATEWAY_HOST={host}) and "
    "API_KEYS is not set. Set API_KEYS (and send 'Authorization: Bearer KEY'), bind to "
    "127.0.0.1, or set ALLOW_INSECURE_DEFAULTS=true on a development machine."
)


class KeyRequired(Unauthorized):
    """401 with the challenge header RFC 9110 asks for (RFC 6750's form for bearer keys)."""

    def __init__(self, detail: str, *, code: str, error: str | None = None) -> None:
        super().__init__(detail, code=code)
        challenge = 'Bearer realm="clipsearch"' + (f', error="{error}"' if error else "")
        self.headers = {"WWW-Authenticate": challenge}


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def matched_key(request: Request) -> str | None:
    """The configured key the request presents, or None (compared in constant time)."""
    keys = get_settings().api_keys
    given = _presented(request)
    if not keys or not given:
        return None
    # Equal-length digests, and no early exit: the time taken tells nothing about the keys.
    wanted, found = _digest(given), None
    for key in keys:
        secret = key.get_secret_value()
        if hmac.compare_digest(wanted, _digest(secret)):
            found = secret
    return found


def client_identity(request: Request) -> str:
    """Who is asking, for rate limits and idempotency: a valid key's hash, else the client IP.

    An unchecked key is never used, or a client could rotate made-up keys to dodge its limits.
    Behind a proxy, run uvicorn with --proxy-headers so the client address is the real one.
    """
    key = matched_key(request)
    if key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "ip:" + (request.client.host if request.client else "unknown")


def check_key(request: Request) -> None:
    """401 when no key is given or it matches none; both name the scheme to use."""
    if not get_settings().api_keys:
        return
    if _presented(request) is None:
        raise KeyRequired(
            "this route needs an API key: 'Authorization: Bearer KEY'", code="missing_api_key"
        )
    if matched_key(request) is None:
        raise KeyRequired("the API key is not valid", code="invalid_api_key", error="invalid_token")


def require_write(request: Request) -> None:
    """Dependency for routes that change state: never open to anyone who can reach us."""
    settings = get_settings()
    if open_writes_exposed(settings):
        raise Forbidden(
            OPEN_WRITES_REFUSED.format(host=settings.gateway_host), code="writes_need_api_keys"
        )
    check_key(request)


def require_read(request: Request) -> None:
    """Dependency for read routes: keys checked only when API_KEYS_ON_READS is set."""
    if get_settings().api_keys_on_reads:
        check_key(request)
