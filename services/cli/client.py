"""A thin HTTP client on the gateway that turns every failure into one readable CliError."""

from __future__ import annotations

import os
import re
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT = httpx.Timeout(30.0, read=300.0, write=300.0)


class CliError(Exception):
    """A failure to report as one line on stderr, with the exit code to return."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def resolve_url(given: str | None) -> str:
    """--url, else CLIPSEARCH_URL, else GATEWAY_URL, else the local default."""
    for value in (given, os.environ.get("CLIPSEARCH_URL"), os.environ.get("GATEWAY_URL")):
        if value:
            return value.rstrip("/")
    return DEFAULT_URL


def _reason(exc: Exception) -> str:
    """A short lower-case reason from a transport error ('connection refused')."""
    text = str(exc) or exc.__class__.__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text.splitlines()[-1].strip())
    return text[:1].lower() + text[1:]


def error_message(response: httpx.Response) -> str:
    """The gateway's JSON error as '<detail> (<code>)', or the status and a bit of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        code = body.get("code") or f"HTTP {response.status_code}"
        return f"{body['detail']} ({code})"
    text = " ".join(response.text.split())[:200]
    return f"HTTP {response.status_code} from the gateway" + (f": {text}" if text else "")


class Gateway:
    """The gateway at one base URL, with an optional API key."""

    def __init__(self, *, url: str, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self.http = httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT)
        except (httpx.InvalidURL, ValueError) as exc:
            raise CliError(f"not a usable gateway URL {url!r}: {exc}") from exc
        self.url = url

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def absolute(self, path: str) -> str:
        """A full URL for a path the gateway returned (e.g. an image_url)."""
        return str(self.http.base_url.join(path))

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; raise CliError on a transport failure or a non-2xx answer."""
        response = self.send_raw(method, path, **kwargs)
        if response.is_error:
            raise CliError(error_message(response))
        return response

    def send_raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; raise CliError only when no answer came back."""
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise CliError(f"the gateway at {self.url} did not answer in time") from exc
        except httpx.UnsupportedProtocol as exc:
            raise CliError(f"not a usable gateway URL {self.url!r}: {exc}") from exc
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the gateway at {self.url}: {_reason(exc)}") from exc

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request and return the decoded JSON answer."""
        response = self.send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise CliError(f"the gateway at {self.url} sent a non-JSON answer") from exc
