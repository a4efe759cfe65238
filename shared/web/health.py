"""/healthz and /readyz for every service: alive, and each dependency usable, said by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from shared.web.http import error_response

# A dependency's probe: returns when usable, raises (anything) when not.
Probe = Callable[[], object]


class Alive(BaseModel):
    """GET /healthz."""

    status: str = "ok"


class Ready(BaseModel):
    """GET /readyz when every dependency is usable."""

    status: str = "ready"
    checks: dict[str, str]
    model: str | None = None


def run_probe(probe: Probe) -> str:
    """'ok', or what went wrong in one line."""
    try:
        probe()
    except Exception as exc:  # any failure means not ready; say which
        return f"error: {exc.__class__.__name__}: {str(exc)[:200]}"
    return "ok"


def health_router(
    probes: Callable[[Request], Mapping[str, Probe]],
    *,
    model: Callable[[Request], str | None] = lambda _: None,
) -> APIRouter:
    """The two health routes, with the service's probes (named dependencies)."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz() -> Alive:
        """The process is alive."""
        return Alive()

    @router.get(
        "/readyz",
        response_model=Ready,
        responses={503: {"description": "a dependency is unavailable (checks say which)"}},
    )
    def readyz(request: Request) -> Any:
        """Every dependency is usable."""
        checks = {name: run_probe(probe) for name, probe in probes(request).items()}
        if all(v == "ok" for v in checks.values()):
            return Ready(checks=checks, model=model(request))
        failing = ", ".join(name for name, v in checks.items() if v != "ok")
        return error_response(503, "not_ready", f"not usable: {failing}", checks=checks)

    return router


__all__ = ["Alive", "JSONResponse", "Probe", "Ready", "health_router", "run_probe"]
