"""Insecure defaults a service refuses: placeholder secrets, open writes beyond loopback."""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from shared.settings import Settings

# What the repository's examples and MinIO ship instead of secrets.
PLACEHOLDER_PREFIX = "CHANGE_ME"
DEFAULT_CREDENTIALS = frozenset({"minioadmin"})


class InsecureSettings(RuntimeError):
    """The settings hold a placeholder secret and ALLOW_INSECURE_DEFAULTS is not set."""


def is_placeholder(value: str | None) -> bool:
    """Whether `value` is a placeholder rather than a secret."""
    if not value:
        return False
    value = value.strip()
    return value.upper().startswith(PLACEHOLDER_PREFIX) or value in DEFAULT_CREDENTIALS


def placeholder_secrets(settings: Settings) -> list[str]:
    """The settings (and boto3's AWS_* variables) that hold a placeholder, by name."""
    found = []
    if any(is_placeholder(key.get_secret_value()) for key in settings.api_keys):
        found.append("API_KEYS")
    for name, secret in (
        ("MILVUS_TOKEN", settings.milvus_token),
        ("S3_ACCESS_KEY", settings.s3_access_key),
        ("S3_SECRET_KEY", settings.s3_secret_key),
    ):
        if secret is not None and is_placeholder(secret.get_secret_value()):
            found.append(name)
    if is_placeholder(urlparse(settings.redis_url).password):
        found.append("REDIS_URL (its password)")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if is_placeholder(os.environ.get(name)):
            found.append(name)
    return found


def refuse_placeholders(settings: Settings) -> Settings:
    """`settings`, unless a secret in them is a placeholder (named, never shown)."""
    found = placeholder_secrets(settings)
    if found and not settings.allow_insecure_defaults:
        raise InsecureSettings(
            f"refusing to start: {', '.join(found)} {'holds' if len(found) == 1 else 'hold'} "
            "a placeholder (CHANGE_ME..., minioadmin), not a secret. Set real values, e.g. from "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))', "
            "or ALLOW_INSECURE_DEFAULTS=true on a development machine."
        )
    return settings


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or 0.0.0.0-like wildcard: assume others can reach it


def open_writes_exposed(settings: Settings) -> bool:
    """Whether a gateway reachable beyond loopback would take writes without API keys."""
    return (
        not settings.api_keys
        and not settings.allow_insecure_defaults
        and not is_loopback(settings.gateway_host)
    )
