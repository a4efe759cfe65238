"""The job store on a real Redis: exact counters under re-reports, states, idempotency keys."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from services.stack import Stack
from shared.errors import Conflict, NotFound
from shared.jobs import ItemResult, JobStore


@pytest.fixture
def jobs(stack: Stack) -> JobStore:
    return JobStore.from_url(stack.settings.redis_url)


def test_each_item_counts_once_even_when_reported_again(jobs: JobStore) -> None:
    job_id = jobs.create(total=3)
    assert jobs.start(job_id) == "running"
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
    assert jobs.start(job_id) == "cancelled"  # batches not started are skipped
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
