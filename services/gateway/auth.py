"""API keys: required on write routes when API_KEYS is set, optionally on reads."""

from __future__ import annotations

import hmac

from fastapi import Request

from shared.errors import Forbidden, Unauthorized
from shared.settings import get_settings


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def check_key(request: Request) -> None:
    """401 when no key is given, 403 when it matches none (compared in constant time)."""
    keys = get_settings().api_keys
    if not keys:
        return
    given = _presented(request)
    if not given:
        raise Unauthorized(
            "this route needs an API key: 'Authorization: Bearer KEY'", code="missing_api_key"
        )
    ok = False
    for key in keys:  # no early exit: the time taken does not tell which key nearly matched
        ok |= hmac.compare_digest(given.encode(), key.get_secret_value().encode())
    if not ok:
        raise Forbidden("the API key is not valid", code="invalid_api_key")


def require_write(request: Request) -> None:
    """Dependency for routes that change state."""
    check_key(request)


def require_read(request: Request) -> None:
    """Dependency for read routes: keys checked only when API_KEYS_ON_READS is set."""
    if get_settings().api_keys_on_reads:
        check_key(request)
