"""Job records in Redis: states, exact counters (each item counted once), per-item errors."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.errors import Conflict, NotFound

State = Literal["queued", "running", "succeeded", "completed_with_errors", "failed", "cancelled"]
Outcome = Literal["done", "failed", "duplicates"]
FINAL_STATES = frozenset({"succeeded", "completed_with_errors", "failed", "cancelled"})
PREFIX = "clipsearch"

# Count each item once (retries and redeliveries re-report), then settle the final state.
_RECORD = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return nil end
for i = 2, #ARGV, 3 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 1], 1)
    if ARGV[i + 2] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[i + 2]) end
  end
end
if state == 'queued' or state == 'running' then
  local c = redis.call('HMGET', KEYS[1], 'total', 'done', 'failed', 'duplicates')
  local total, done, failed, dup = tonumber(c[1]), tonumber(c[2]), tonumber(c[3]), tonumber(c[4])
  if done + failed + dup >= total then
    local final = 'succeeded'
    if done + dup == 0 then final = 'failed'
    elseif failed > 0 then final = 'completed_with_errors' end
    redis.call('HSET', KEYS[1], 'state', final, 'finished_at', ARGV[1])
    if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
      redis.call('HSET', KEYS[1], 'started_at', ARGV[1])
    end
    state = final
  end
end
return state
"""

_START = """
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
end
return redis.call('HGET', KEYS[1], 'state')
"""

_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
  return 'ok'
end
return state
"""


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The outcome of one item of a job; `key` is unique within the job."""

    key: str
    outcome: Outcome
    filename: str = ""
    code: str = ""
    detail: str = ""

    def error_json(self) -> str:
        if self.outcome != "failed":
            return ""
        return json.dumps({"filename": self.filename, "code": self.code, "detail": self.detail})


def _iso(ts: str | None) -> str | None:
    return datetime.fromtimestamp(float(ts), UTC).isoformat() if ts else None


class JobStore:
    """Job state and counters kept in Redis, safe under concurrent workers and retries."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._record = client.register_script(_RECORD)
        self._start = client.register_script(_START)
        self._cancel = client.register_script(_CANCEL)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        """A job store on the Redis at `url`."""
        # Ride out a Redis restart (about a minute) instead of failing the batch in hand.
        retry = Retry(ExponentialBackoff(cap=4.0, base=0.1), retries=25)
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=30,
            socket_timeout=10,
            socket_connect_timeout=5,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client)

    @staticmethod
    def _key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}:job:{job_id}" + (f":{part}" if part else "")

    def create(self, *, total: int, rejected: Iterable[ItemResult] = (), job_id: str = "") -> str:
        """Record a new queued job of `total` items, some already rejected; return its id."""
        job_id = job_id or uuid.uuid4().hex
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            self._key(job_id),
            mapping={
                "job_id": job_id,
                "state": "queued",
                "total": total,
                "done": 0,
                "failed": 0,
                "duplicates": 0,
                "created_at": now,
            },
        )
        pipe.zadd(f"{PREFIX}:jobs", {job_id: now})
        pipe.execute()
        rejected = list(rejected)
        if rejected:
            self.record(job_id, rejected)
        return job_id

    def record(self, job_id: str, results: Iterable[ItemResult]) -> str | None:
        """Count outcomes (each item key at most once) and settle the state; return it."""
        argv: list[Any] = [time.time()]
        for res in results:
            argv += [res.key, res.outcome, res.error_json()]
        keys = [self._key(job_id), self._key(job_id, "seen"), self._key(job_id, "errors")]
        state = self._record(keys=keys, args=argv)
        return str(state) if state is not None else None

    def start(self, job_id: str) -> str | None:
        """Move a queued job to running; return the state it is in now."""
        state = self._start(keys=[self._key(job_id)], args=[time.time()])
        return str(state) if state is not None else None

    def state(self, job_id: str) -> str | None:
        """The job's state, or None if there is no such job."""
        value = self.r.hget(self._key(job_id), "state")
        return str(value) if value is not None else None

    def cancel(self, job_id: str) -> str:
        """Cancel a queued or running job; batches not yet started will be skipped."""
        state = self._cancel(keys=[self._key(job_id)], args=[time.time()])
        if state is None:
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        if state != "ok":
            raise Conflict(f"job {job_id} already ended as {state}", code="job_finished")
        return "cancelled"

    def get(self, job_id: str, *, max_errors: int = 1000) -> dict[str, Any]:
        """The job's public record; NotFound for an unknown id."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self._key(job_id))
        pipe.lrange(self._key(job_id, "errors"), 0, max_errors - 1)
        raw, errors = pipe.execute()
        if not raw:
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        total, done = int(raw["total"]), int(raw["done"])
        failed, dup = int(raw["failed"]), int(raw["duplicates"])
        processed = done + failed + dup
        eta = None
        if raw["state"] == "running" and raw.get("started_at") and processed:
            elapsed = max(time.time() - float(raw["started_at"]), 1e-3)
            eta = round((total - processed) * elapsed / processed, 1)
        return {
            "job_id": job_id,
            "state": raw["state"],
            "total": total,
            "done": done,
            "failed": failed,
            "duplicates": dup,
            "progress": round(processed / total, 4) if total else 1.0,
            "created_at": _iso(raw.get("created_at")),
            "started_at": _iso(raw.get("started_at")),
            "finished_at": _iso(raw.get("finished_at")),
            "eta_seconds": eta,
            "errors": [json.loads(e) for e in errors],
        }

    def recent(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently created jobs, newest first."""
        ids = self.r.zrevrange(f"{PREFIX}:jobs", 0, limit - 1)
        out = []
        for job_id in ids:
            try:
                out.append(self.get(str(job_id), max_errors=20))
            except NotFound:
                continue
        return out

    def claim_idempotency_key(self, key: str, job_id: str, *, ttl_s: int = 86_400) -> str:
        """Bind an Idempotency-Key to `job_id`, or return the job it already names."""
        name = f"{PREFIX}:idem:{key}"
        if self.r.set(name, job_id, nx=True, ex=ttl_s):
            return job_id
        return str(self.r.get(name))

    def ping(self) -> bool:
        """Whether Redis answers."""
        return bool(self.r.ping())
