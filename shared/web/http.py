"""FastAPI glue every HTTP service shares: the error handlers and JSON error bodies."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ClipsearchError

log = logging.getLogger(__name__)


def error_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    """A JSON error body with a stable code and a readable detail (503s say when to retry)."""
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", "5")
    return JSONResponse({"code": code, "detail": detail, **extra}, status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error kind to one JSON shape: {code, detail}; never a traceback."""

    @app.exception_handler(ClipsearchError)
    async def _ours(_: Request, exc: ClipsearchError) -> JSONResponse:
        # An error may carry response headers (Retry-After on 429, WWW-Authenticate on 401).
        headers: Mapping[str, str] | None = getattr(exc, "headers", None)
        return error_response(exc.status_code, exc.code, exc.detail, headers=headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; see the service log")


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Let pages on these origins call the API from a browser (CORS_ORIGINS; none by default).

    Call it after every other middleware so that it wraps them all (their errors included).
    """
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-API-Key"],
        expose_headers=["Location", "Retry-After"],
        max_age=600,
    )
