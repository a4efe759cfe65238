"""Refuse oversized request bodies: by Content-Length before reading, else while streaming."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import PayloadTooLarge
from shared.web.http import error_response

# JSON bodies (search, image-id lookups of up to 10,000 ids) are far smaller than this.
MAX_SMALL_BODY = 2 * 1024 * 1024


class BodyTooLarge(PayloadTooLarge):
    """The body went over the route's limit while it was being read."""


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit_for(method, path)` bytes, chunked or not."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str, str], int | None]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > limit:
            await _refuse(
                scope, receive, send, f"the request is {length} bytes; the limit is {limit}"
            )
            return
        received, started = 0, False

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(
                        f"the request is over the limit of {limit} bytes", code="payload_too_large"
                    )
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped, tracked)
        except BodyTooLarge as exc:
            if started:
                raise
            await _refuse(scope, receive, send, exc.detail)


async def _refuse(scope: Scope, receive: Receive, send: Send, detail: str) -> None:
    response = error_response(413, "payload_too_large", detail, headers={"Connection": "close"})
    await response(scope, receive, send)
