"""Job records in Redis: states, exact counters (each item counted once), per-item errors.

Every key carries the deployment's namespace, so stacks sharing one Redis never see each
other's jobs. Each batch a job sends is recorded too, until it is counted: a batch whose
message the broker lost can be found and sent again (services/worker/sweeper.py).
"""

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
from shared.settings import Settings

State = Literal["queued", "running", "succeeded", "completed_with_errors", "failed", "cancelled"]
Outcome = Literal["done", "failed", "duplicates"]
FINAL_STATES = frozenset({"succeeded", "completed_with_errors", "failed", "cancelled"})
DEFAULT_RETENTION_S = 7 * 86_400

# KEYS of every job script: the job hash, its seen set, errors list, batches hash, running
# hash, then the namespace's active set and sequence counters.
# A job that ends keeps its records for the retention time and leaves the active set.
_RETIRE = """
local function retire(ttl)
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
  redis.call('ZREM', KEYS[6], KEYS[1])
end
"""

# Count each item once (retries and redeliveries re-report), then settle the final state.
# ARGV: now, batch (or ''), retention, then (key, outcome, error) per item.
_RECORD = (
    _RETIRE
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return nil end
for i = 4, #ARGV, 3 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 1], 1)
    if ARGV[i + 2] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[i + 2]) end
  end
end
if ARGV[2] ~= '' then
  redis.call('HDEL', KEYS[4], ARGV[2])
  redis.call('HDEL', KEYS[5], ARGV[2])
end
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'touched_at', ARGV[1])
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
    retire(ARGV[3])
  end
end
return state
"""
)

# A batch starts: the job runs, the namespace's newest taken message moves on, and the
# batch's attempts in flight are counted (an attempt that never ended died with its worker).
# ARGV: now, batch (or ''), seq. Returns {state, attempts in flight including this one}.
_START = """
if tonumber(ARGV[3]) > tonumber(redis.call('GET', KEYS[8]) or '0') then
  redis.call('SET', KEYS[8], ARGV[3])
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {false, 0} end
if state ~= 'queued' and state ~= 'running' then return {state, 0} end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
  state = 'running'
end
redis.call('HSET', KEYS[1], 'touched_at', ARGV[1])
local n = 0
if ARGV[2] ~= '' and redis.call('HEXISTS', KEYS[4], ARGV[2]) == 1 then
  n = redis.call('HINCRBY', KEYS[5], ARGV[2], 1)
end
return {state, n}
"""

# Record a batch before its message is sent. ARGV: now, items JSON, requeues.
# Returns {batch number, sequence number of its message}.
_ADD_BATCH = """
local b = redis.call('HINCRBY', KEYS[1], 'batches', 1) - 1
local s = redis.call('INCR', KEYS[7])
redis.call('HSET', KEYS[4], b,
  '{"seq": ' .. s .. ', "requeues": ' .. ARGV[3] .. ', "items": ' .. ARGV[2] .. '}')
redis.call('HSET', KEYS[1], 'last_seq', s, 'touched_at', ARGV[1])
return {b, s}
"""

_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'touched_at', ARGV[1]) end
return 1
"""

_CANCEL = (
    _RETIRE
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[3]) end
  retire(ARGV[2])
  return 'ok'
end
return state
"""
)


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


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch a job sent and has not counted yet, as recorded before its message went out."""

    job_id: str
    number: int
    seq: int
    requeues: int
    items: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class Started:
    """What a batch found when it started: the job's state and its attempts in flight."""

    state: str | None
    attempts: int


def _iso(ts: str | None) -> str | None:
    return datetime.fromtimestamp(float(ts), UTC).isoformat() if ts else None


class JobStore:
    """Job state and counters kept in Redis, safe under concurrent workers and retries."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "clipsearch",
        retention_s: int = DEFAULT_RETENTION_S,
    ) -> None:
        self.r = client
        self.namespace = namespace
        self.retention_s = retention_s
        self._record = client.register_script(_RECORD)
        self._start = client.register_script(_START)
        self._add_batch = client.register_script(_ADD_BATCH)
        self._touch = client.register_script(_TOUCH)
        self._cancel = client.register_script(_CANCEL)

    @classmethod
    def from_url(
        cls, url: str, *, namespace: str = "clipsearch", retention_s: int = DEFAULT_RETENTION_S
    ) -> JobStore:
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
        return cls(client, namespace=namespace, retention_s=retention_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """The job store of the deployment `settings` name."""
        return cls.from_url(
            settings.redis_url,
            namespace=settings.namespace,
            retention_s=int(settings.job_retention.total_seconds()),
        )

    def key(self, name: str) -> str:
        """A namespace-wide key: `jobs` (the index), `active`, `seq`, `taken_seq`, ..."""
        return f"{self.namespace}:{name}"

    def _job_key(self, job_id: str, part: str = "") -> str:
        return self.key(f"job:{job_id}") + (f":{part}" if part else "")

    def _keys(self, job_id: str) -> list[str]:
        parts = ("", "seen", "errors", "batches", "running")
        return [self._job_key(job_id, p) for p in parts] + [
            self.key("active"),
            self.key("seq"),
            self.key("taken_seq"),
        ]

    def create(
        self,
        *,
        total: int,
        rejected: Iterable[ItemResult] = (),
        job_id: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Record a new queued job of `total` items, some already rejected; return its id."""
        job_id = job_id or uuid.uuid4().hex
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            self._job_key(job_id),
            mapping={
                "job_id": job_id,
                "state": "queued",
                "total": total,
                "done": 0,
                "failed": 0,
                "duplicates": 0,
                "created_at": now,
                "touched_at": now,
                "metadata": json.dumps(metadata or {}),
            },
        )
        pipe.zadd(self.key("jobs"), {job_id: now})
        pipe.zadd(self.key("active"), {self._job_key(job_id): now})
        # The index forgets jobs whose records have expired.
        pipe.zremrangebyscore(self.key("jobs"), "-inf", now - self.retention_s - 86_400)
        pipe.execute()
        rejected = list(rejected)
        if rejected:
            self.record(job_id, rejected)
        return job_id

    def add_batch(self, job_id: str, items: list[Any], *, requeues: int = 0) -> tuple[int, int]:
        """Record a batch about to be sent; return its number and its message's sequence."""
        number, seq = self._add_batch(
            keys=self._keys(job_id), args=[time.time(), json.dumps(items), requeues]
        )
        return int(number), int(seq)

    def record(self, job_id: str, results: Iterable[ItemResult], *, batch: str = "") -> str | None:
        """Count outcomes (each item key at most once) and settle the state; return it.

        With `batch`, that batch is counted whole: its record is dropped.
        """
        argv: list[Any] = [time.time(), batch, self.retention_s]
        for res in results:
            argv += [res.key, res.outcome, res.error_json()]
        state = self._record(keys=self._keys(job_id), args=argv)
        return str(state) if state is not None else None

    def start(self, job_id: str, *, batch: str = "", seq: int = 0) -> Started:
        """A batch starts: move a queued job to running and count the batch's attempt."""
        state, attempts = self._start(keys=self._keys(job_id), args=[time.time(), batch, seq])
        return Started(str(state) if state else None, int(attempts))

    def end_attempt(self, job_id: str, batch: str) -> None:
        """An attempt at a batch ended without counting it (a retry follows, or it was split)."""
        if batch:
            self.r.hdel(self._job_key(job_id, "running"), batch)

    def drop_batch(self, job_id: str, batch: str) -> None:
        """Forget a batch that was replaced by others (split)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self._job_key(job_id, "batches"), batch)
        pipe.hdel(self._job_key(job_id, "running"), batch)
        pipe.execute()

    def touch(self, job_id: str) -> None:
        """A batch of the job is making progress (the sweeper leaves it alone).

        Only a job that still has a record: a write to one that expired or that Redis lost
        would leave a fragment behind, with no retention time.
        """
        self._touch(keys=self._keys(job_id), args=[time.time()])

    def state(self, job_id: str) -> str | None:
        """The job's state, or None if there is no such job."""
        value = self.r.hget(self._job_key(job_id), "state")
        return str(value) if value is not None else None

    def cancel(self, job_id: str, *, reason: str = "") -> str:
        """Cancel a queued or running job; batches not yet started will be skipped."""
        state = self._cancel(keys=self._keys(job_id), args=[time.time(), self.retention_s, reason])
        if state is None:
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        if state != "ok":
            raise Conflict(f"job {job_id} already ended as {state}", code="job_finished")
        return "cancelled"

    # What the sweeper reads

    def active(self) -> list[str]:
        """Ids of the jobs not yet ended, oldest first."""
        prefix = len(self._job_key(""))
        return [str(k)[prefix:] for k in self.r.zrange(self.key("active"), 0, -1)]

    def forget_active(self, job_id: str) -> None:
        """Drop a job from the active set (it ended or its record is gone)."""
        self.r.zrem(self.key("active"), self._job_key(job_id))

    def raw(self, job_id: str) -> dict[str, str]:
        """The job's hash as stored (empty if there is no such job)."""
        return {str(k): str(v) for k, v in self.r.hgetall(self._job_key(job_id)).items()}

    def taken_seq(self) -> int:
        """The sequence number of the newest message a worker has started."""
        return int(self.r.get(self.key("taken_seq")) or 0)

    def pending_batches(self, job_id: str) -> list[Batch]:
        """The job's batches not yet counted, with only the items not yet counted."""
        out = []
        seen_key = self._job_key(job_id, "seen")
        for number, raw in self.r.hgetall(self._job_key(job_id, "batches")).items():
            rec = json.loads(raw)
            items = rec["items"]
            if items:
                counted = self.r.smismember(seen_key, [it["key"] for it in items])
                items = [it for it, c in zip(items, counted, strict=True) if not c]
            out.append(Batch(job_id, int(number), rec["seq"], rec["requeues"], items))
        return sorted(out, key=lambda b: b.number)

    def get(self, job_id: str, *, max_errors: int = 1000) -> dict[str, Any]:
        """The job's public record; NotFound for an unknown id."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self._job_key(job_id))
        pipe.lrange(self._job_key(job_id, "errors"), 0, max_errors - 1)
        raw, errors = pipe.execute()
        if not raw:
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        if "total" not in raw or "state" not in raw:
            # Redis came back without the job's creation (it lost its last writes: a power cut,
            # a restore); later writes for the job left only fragments. Not a 500.
            raise NotFound(
                f"job {job_id!r} has only fragments of a record: Redis lost its creation",
                code="job_not_found",
            )
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
            **({"reason": raw["reason"]} if raw.get("reason") else {}),
        }

    def recent(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently created jobs, newest first."""
        ids = self.r.zrevrange(self.key("jobs"), 0, limit - 1)
        out = []
        for job_id in ids:
            try:
                out.append(self.get(str(job_id), max_errors=20))
            except NotFound:
                continue
        return out

    def idempotency_key(self, key: str) -> str:
        """The Redis key that binds an Idempotency-Key to its job."""
        return self.key(f"idem:{key}")

    def claim_idempotency_key(self, key: str, job_id: str, *, ttl_s: int = 86_400) -> str:
        """Bind an Idempotency-Key to `job_id`, or return the job it already names."""
        name = self.idempotency_key(key)
        if self.r.set(name, job_id, nx=True, ex=ttl_s):
            return job_id
        return str(self.r.get(name))

    def ping(self) -> bool:
        """Whether Redis answers."""
        return bool(self.r.ping())
