"""Write marks: the newest write wins, unknown reads strong, and a search honours the mark."""

from __future__ import annotations

import time
import uuid

import pytest
from pymilvus import mkts_from_unixtime

from shared.freshness import WriteMarks
from shared.vectors import CLOCK_SKEW_S, VectorStore


@pytest.fixture
def marks(redis_url: str) -> WriteMarks:
    return WriteMarks.from_url(redis_url, f"c_{uuid.uuid4().hex[:8]}")


def _server_now(marks: WriteMarks) -> float:
    seconds, micros = marks.r.time()
    return float(seconds) + micros / 1_000_000


def test_marks_only_move_forward(marks: WriteMarks) -> None:
    assert marks.last() is None
    marks.mark(1_700_000_000.25)
    marks.mark(1_600_000_000.0)  # a slower writer reporting late must not move it back
    assert marks.last() == 1_700_000_000.25
    before = _server_now(marks)
    other = WriteMarks(marks.r, f"other_{uuid.uuid4().hex[:8]}")
    other.mark()
    assert marks.last() == 1_700_000_000.25  # per collection
    assert before <= (other.last() or 0) <= _server_now(marks)


def test_a_write_time_in_the_future_is_clamped_to_the_servers_clock(marks: WriteMarks) -> None:
    """A writer whose clock runs an hour ahead must not make searches wait an hour."""
    marks.mark(time.time() + 3600)
    assert (marks.last() or 0) <= _server_now(marks)
    # Nor does a mark already stored in the future (an older writer, or by hand).
    marks.r.set(marks.key, repr(time.time() + 3600))
    last = marks.last()
    assert last is not None and last <= _server_now(marks)
    # What a search then asks Milvus for is no later than now plus the skew allowance.
    store = VectorStore(uri="http://127.0.0.1:1", token=None, collection="c")
    level = store.read_level(last)
    assert level["guarantee_timestamp"] <= mkts_from_unixtime(time.time() + 1 + CLOCK_SKEW_S)


def test_marks_keep_fractions_of_a_second(marks: WriteMarks) -> None:
    at = _server_now(marks) - 10.123456
    marks.mark(at)
    assert marks.last() == pytest.approx(at, abs=1e-6)


def test_redis_away_reads_as_unknown() -> None:
    assert WriteMarks.from_url("redis://127.0.0.1:1/0", "c", timeout_s=0.2).last() is None


def test_read_levels() -> None:
    session = VectorStore(uri="http://127.0.0.1:1", token=None, collection="c")
    assert session.read_level(None) == {"consistency_level": "Strong"}
    at = 1_800_000_000.5
    assert session.read_level(at) == {
        "consistency_level": "Customized",
        "guarantee_timestamp": mkts_from_unixtime(at + CLOCK_SKEW_S),
    }
    bounded = VectorStore(uri="x", token=None, collection="c", consistency="Bounded")
    assert bounded.read_level(at) == {"consistency_level": "Bounded"}
