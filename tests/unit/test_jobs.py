"""The job store on a real Redis: exact counters under re-reports, states, idempotency keys."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.errors import Conflict, NotFound
from shared.jobs import ItemResult, JobStore


@pytest.fixture
def jobs(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, namespace=f"t{uuid.uuid4().hex[:8]}", retention_s=600)


def test_each_item_counts_once_even_when_reported_again(jobs: JobStore) -> None:
    job_id = jobs.create(total=3)
    assert jobs.start(job_id).state == "running"
    batch = [ItemResult("i1", "done"), ItemResult("i2", "failed", "b.jpg", "decode_failed", "x")]
    assert jobs.record(job_id, batch) == "running"
    assert jobs.record(job_id, batch) == "running"  # a redelivered batch re-reports
    assert jobs.record(job_id, [ItemResult("i3", "duplicates")]) == "completed_with_errors"
    job = jobs.get(job_id)
    assert (job["done"], job["failed"], job["duplicates"], job["progress"]) == (1, 1, 1, 1.0)
    assert job["errors"] == [{"filename": "b.jpg", "code": "decode_failed", "detail": "x"}]


def test_concurrent_reports_are_exact(jobs: JobStore) -> None:
    job_id = jobs.create(total=500)
    results = [ItemResult(f"i{i}", "done") for i in range(500)]
    with ThreadPoolExecutor(8) as pool:  # every item reported twice, from 8 threads
        list(pool.map(lambda r: jobs.record(job_id, [r]), results + results))
    job = jobs.get(job_id)
    assert (job["done"], job["state"]) == (500, "succeeded")


def test_final_states(jobs: JobStore) -> None:
    all_failed = jobs.create(total=1, rejected=[ItemResult("r1", "failed", "x", "empty_file", "")])
    assert jobs.get(all_failed)["state"] == "failed"
    only_dups = jobs.create(total=1)
    jobs.record(only_dups, [ItemResult("i1", "duplicates")])
    assert jobs.get(only_dups)["state"] == "succeeded"


def test_cancel(jobs: JobStore) -> None:
    job_id = jobs.create(total=2)
    assert jobs.cancel(job_id) == "cancelled"
    assert jobs.start(job_id).state == "cancelled"  # batches not started are skipped
    jobs.record(job_id, [ItemResult("i1", "done")])
    assert jobs.get(job_id)["state"] == "cancelled"
    with pytest.raises(Conflict):
        jobs.cancel(job_id)
    with pytest.raises(NotFound):
        jobs.cancel("0" * 32)


def test_unknown_job_is_not_found_never_pending(jobs: JobStore) -> None:
    with pytest.raises(NotFound):
        jobs.get("1" * 32)
    assert jobs.record("1" * 32, [ItemResult("i1", "done")]) is None
    assert jobs.state("1" * 32) is None


def test_idempotency_key_names_the_first_job(jobs: JobStore) -> None:
    first = jobs.claim_idempotency_key("k-123", "a" * 32)
    second = jobs.claim_idempotency_key("k-123", "b" * 32)
    assert first == second == "a" * 32


def test_a_finished_job_expires_after_the_retention_time(jobs: JobStore) -> None:
    job_id = jobs.create(total=2)
    n, _ = jobs.add_batch(job_id, [{"key": "i1"}, {"key": "i2"}])
    assert jobs.active() == [job_id]
    jobs.record(job_id, [ItemResult("i1", "done")])
    assert jobs.r.ttl(f"{jobs.namespace}:job:{job_id}") == -1  # running: kept
    jobs.record(job_id, [ItemResult("i2", "failed", "b", "decode_failed", "x")], batch=str(n))
    for part in ("", ":seen", ":errors"):
        assert 0 < jobs.r.ttl(f"{jobs.namespace}:job:{job_id}{part}") <= 600
    assert jobs.active() == []
    cancelled = jobs.create(total=1)
    jobs.cancel(cancelled, reason="upload_interrupted")
    assert 0 < jobs.r.ttl(f"{jobs.namespace}:job:{cancelled}") <= 600
    assert jobs.get(cancelled)["reason"] == "upload_interrupted"


def test_batches_are_kept_until_counted_and_attempts_in_flight_counted(jobs: JobStore) -> None:
    job_id = jobs.create(total=3)
    b0, s0 = jobs.add_batch(job_id, [{"key": "i1"}, {"key": "i2"}])
    b1, s1 = jobs.add_batch(job_id, [{"key": "i3"}])
    assert (b0, b1) == (0, 1) and s1 == s0 + 1
    assert jobs.start(job_id, batch="0", seq=s0).attempts == 1
    assert jobs.start(job_id, batch="0", seq=s0).attempts == 2  # the first one never ended
    assert jobs.taken_seq() == s0
    jobs.end_attempt(job_id, "0")
    assert jobs.start(job_id, batch="0", seq=s0).attempts == 1
    jobs.record(job_id, [ItemResult("i1", "done")])  # counted, but the batch did not end
    pending = jobs.pending_batches(job_id)
    left = [(b.number, [it["key"] for it in b.items]) for b in pending]
    assert left == [(0, ["i2"]), (1, ["i3"])]
    jobs.record(job_id, [ItemResult("i2", "done")], batch="0")
    assert [b.number for b in jobs.pending_batches(job_id)] == [1]


def test_namespaces_keep_deployments_apart(jobs: JobStore) -> None:
    other = JobStore(jobs.r, namespace=jobs.namespace + "-other")
    mine = jobs.create(total=1)
    theirs = other.create(total=1)
    assert [j["job_id"] for j in jobs.recent()] == [mine]
    assert [j["job_id"] for j in other.recent()] == [theirs]
    with pytest.raises(NotFound):
        jobs.get(theirs)


def test_a_record_redis_lost_in_part_is_not_found_not_a_crash(jobs: JobStore) -> None:
    """Found by the chaos run: Redis restored without a job's creation, then a write for it."""
    jobs.r.hset(f"{jobs.namespace}:job:gone", "touched_at", 1.0)
    with pytest.raises(NotFound, match="fragments"):
        jobs.get("gone")


def test_touching_a_job_that_has_no_record_leaves_nothing_behind(jobs: JobStore) -> None:
    jobs.touch("0" * 32)  # expired, or lost by Redis: no fragment, no key without a TTL
    assert jobs.r.exists(f"{jobs.namespace}:job:{'0' * 32}") == 0
