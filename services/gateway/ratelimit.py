"""Per-client rate limits on uploads and searches, counted in Redis by every gateway process."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from services.gateway import metrics
from services.gateway.auth import client_identity
from shared.errors import ClipsearchError

log = logging.getLogger(__name__)
# A Redis that does not answer at once must not hold up searches (the limits fail open).
REDIS_TIMEOUT_S = 0.5


class RateLimited(ClipsearchError):
    """Too many requests from one client: 429 with Retry-After."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


def parse_rule(rule: str, *, name: str) -> list[RateLimitItem]:
    """'60/minute' or '10/second;600/minute' as limit items; '' or '0' (no limit) as none."""
    rule = rule.strip()
    if rule in ("", "0"):
        return []
    try:
        items = parse_many(rule)
    except ValueError as exc:
        raise ValueError(f"{name}={rule!r} is not a rate like '60/minute': {exc}") from exc
    return [item for item in items if item.amount > 0]


def _async_uri(redis_url: str) -> str:
    if redis_url.startswith("unix://"):
        return "async+redis+" + redis_url
    return "async+" + redis_url


class RateLimits:
    """The configured limits and the moving-window limiter that counts hits in Redis."""

    def __init__(
        self, *, redis_url: str, rules: dict[str, list[RateLimitItem]], namespace: str = ""
    ) -> None:
        self.rules = rules
        self.limiter: MovingWindowRateLimiter | None = None
        if any(rules.values()):
            storage = RedisStorage(
                _async_uri(redis_url),
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=f"{namespace}:limits" if namespace else "LIMITS",
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            )
            self.limiter = MovingWindowRateLimiter(storage)

    async def hit(self, scope: str, identity: str) -> None:
        """Count one request of `identity` against `scope`'s limits; RateLimited if over."""
        if self.limiter is None:
            return
        for item in self.rules.get(scope, []):
            try:
                if await self.limiter.hit(item, scope, identity):
                    continue
                stats = await self.limiter.get_window_stats(item, scope, identity)
            except StorageError as exc:
                # Redis is away: serve rather than refuse (uploads then fail on the job store).
                log.warning("rate limit not checked, Redis is unavailable: %s", exc)
                return
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
            metrics.RATE_LIMITED.labels(scope).inc()
            raise RateLimited(
                f"too many {scope}: the limit is {item}; retry in {retry_after} s",
                retry_after=retry_after,
            )


def limit(scope: str) -> Callable[[Request], Awaitable[None]]:
    """A route dependency that counts the request against `scope` ('uploads', 'searches')."""

    async def dependency(request: Request) -> None:
        limits: RateLimits = request.app.state.gw.rate_limits
        await limits.hit(scope, client_identity(request))

    return dependency
