"""Read-your-writes across services: when the collection was last written, kept in Redis.

Milvus gives read-your-writes only within one client (Session) or by waiting for its time
tick on every search (Strong: ~0.4 s a query on standalone here). Workers write, the query
service reads, so the writers record when each write returned; a search then asks Milvus
for a view at least that new (a guarantee timestamp) and waits only when a write is that
recent. Searches long after the last write cost nothing extra.
"""

from __future__ import annotations

import logging
import time

import redis

log = logging.getLogger(__name__)
PREFIX = "clipsearch"
# Keep the larger of the stored and the given time: writers on several hosts may report out
# of order, and a mark must never move back.
_MARK = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


class WriteMarks:
    """The wall-clock time of the newest write to one collection that a service made."""

    def __init__(self, client: redis.Redis, collection: str) -> None:
        self.r = client
        self.key = f"{PREFIX}:milvus:{collection}:written_at"
        self._mark = client.register_script(_MARK)

    @classmethod
    def from_url(cls, url: str, collection: str, *, timeout_s: float = 1.0) -> WriteMarks:
        """Marks on the Redis at `url`; short timeouts, because a search must not hang on it."""
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        return cls(client, collection)

    def mark(self, at: float | None = None) -> None:
        """Record a write that returned at `at` (now by default)."""
        self._mark(keys=[self.key], args=[repr(time.time() if at is None else at)])

    def last(self) -> float | None:
        """When the newest recorded write returned; None if unknown (never set, Redis away)."""
        try:
            value = self.r.get(self.key)
        except redis.RedisError as exc:
            log.warning("write marks unavailable, searching with strong consistency: %s", exc)
            return None
        return float(value) if value else None
