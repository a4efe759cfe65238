"""API keys: required on write routes when API_KEYS is set, optionally on reads."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from fastapi import Request

from shared.errors import Forbidden, Unauthorized
from shared.safety import is_loopback, open_writes_exposed
from shared.settings import get_settings

OPEN_WRITES_REFUSED = (
    "writes are refused: this gateway is reachable beyond loopback ({where}) and "
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


def _arrived_from_beyond_loopback(request: Request) -> bool:
    """Whether this connection came in on a non-loopback address of ours (`uvicorn --host
    0.0.0.0` run by hand, GATEWAY_HOST left at its default); unknown (a unix socket) is no."""
    server = request.scope.get("server")
    if not server:
        return False
    try:
        ipaddress.ip_address(server[0])
    except ValueError:
        return False
    return not is_loopback(server[0])


def require_write(request: Request) -> None:
    """Dependency for routes that change state: never open to anyone who can reach us."""
    settings = get_settings()
    where = f"GATEWAY_HOST={settings.gateway_host}"
    exposed = open_writes_exposed(settings)
    if not exposed and "gateway_host" not in settings.model_fields_set:
        # Not declared: judge by the address this request reached (a container publishing
        # on loopback sets GATEWAY_HOST=127.0.0.1, as its connections arrive on eth0).
        exposed = (
            not settings.api_keys
            and not settings.allow_insecure_defaults
            and _arrived_from_beyond_loopback(request)
        )
        where = f"this request reached {request.scope['server'][0]}" if exposed else where
    if exposed:
        raise Forbidden(OPEN_WRITES_REFUSED.format(where=where), code="writes_need_api_keys")
    check_key(request)


def require_read(request: Request) -> None:
    """Dependency for read routes: keys checked only when API_KEYS_ON_READS is set."""
    if get_settings().api_keys_on_reads:
        check_key(request)
