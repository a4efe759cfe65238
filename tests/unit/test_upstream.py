"""The gateway's client for the query service: answers pass through, outages are 503s."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from services.gateway.upstream import QueryService
from shared.errors import Unavailable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "params": list(request.query.items()),
            "body": body.decode(),
            "type": request.headers.get("content-type"),
        },
        status=422 if request.query.get("fail") else 200,
    )


def test_answers_pass_through_with_params_body_and_status() -> None:
    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("*", "/v1/search", _echo)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = QueryService(f"http://127.0.0.1:{port}/")
        try:
            got = await client.request("GET", "/v1/search", params=[("q", "a dog"), ("k", "3")])
            assert got.status == 200 and got.content_type == "application/json"
            assert b'"params": [["q", "a dog"], ["k", "3"]]' in got.body
            posted = await client.request(
                "POST",
                "/v1/search",
                params=[("fail", "1")],
                body=b'{"text": "cat"}',
                headers={"content-type": "application/json"},
            )
            assert posted.status == 422  # the query service's own errors are not rewritten
            assert b'"body": "{\\"text\\": \\"cat\\"}"' in posted.body
            assert b'"type": "application/json"' in posted.body
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_query_service_that_is_down_is_a_503_with_a_code() -> None:
    async def scenario() -> None:
        client = QueryService(f"http://127.0.0.1:{_free_port()}", timeout_s=5)
        try:
            with pytest.raises(Unavailable) as err:
                await client.request("GET", "/v1/search", params=[("q", "x")])
        finally:
            await client.close()
        assert err.value.code == "query_unavailable" and err.value.status_code == 503

    asyncio.run(scenario())
