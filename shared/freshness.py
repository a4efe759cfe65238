"""Read-your-writes across services: when the collection was last written, kept in Redis.

Milvus gives read-your-writes only within one client (Session) or by waiting for its time
tick on every search (Strong: ~0.4 s a query on standalone here). Workers write, the query
service reads, so the writers record when each write returned; a search then asks Milvus
for a view at least that new (a guarantee timestamp) and waits only when a write is that
recent. Searches long after the last write cost nothing extra.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)
PREFIX = "clipsearch"
# Keep the larger of the stored and the given time: writers on several hosts may report out
# of order, and a mark must never move back. Every mark is clamped to the server's clock
# (Redis TIME; no time given means now): a writer whose clock runs ahead would otherwise leave
# a mark in the future, and each Session search would wait for Milvus to reach it.
_MARK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local at = tonumber(ARGV[1]) or now
if at > now then at = now end
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if at > cur then redis.call('SET', KEYS[1], string.format('%.6f', at)) end
return 1
"""


class WriteMarks:
    """The wall-clock time of the newest write to one collection that a service made."""

    def __init__(self, client: redis.Redis, collection: str, *, namespace: str = PREFIX) -> None:
        self.r = client
        self.key = f"{namespace}:milvus:{collection}:written_at"
        self._mark = client.register_script(_MARK)

    @classmethod
    def from_url(
        cls, url: str, collection: str, *, namespace: str = PREFIX, timeout_s: float = 1.0
    ) -> WriteMarks:
        """Marks on the Redis at `url`; short timeouts, because a search must not hang on it."""
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        return cls(client, collection, namespace=namespace)

    def mark(self, at: float | None = None) -> None:
        """Record a write that returned at `at` (now on the server's clock by default)."""
        self._mark(keys=[self.key], args=["now" if at is None else repr(at)])

    def last(self) -> float | None:
        """When the newest recorded write returned; None if unknown (never set, Redis away).

        Never later than the server's clock: a mark stored in the future (by an older
        writer, or by hand) reads as now, so a search waits at most for writes in flight.
        """
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.get(self.key)
            pipe.time()
            value, (seconds, micros) = pipe.execute()
        except redis.RedisError as exc:
            log.warning("write marks unavailable, searching with strong consistency: %s", exc)
            return None
        if not value:
            return None
        now = float(seconds) + float(micros) / 1_000_000
        return min(float(value), now)
