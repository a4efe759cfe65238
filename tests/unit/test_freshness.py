"""Write marks: the newest write wins, unknown reads strong, and a search honours the mark."""

from __future__ import annotations

import time
import uuid

import pytest
from pymilvus import mkts_from_unixtime

from services.stack import Stack
from shared.freshness import WriteMarks
from shared.vectors import CLOCK_SKEW_S, VectorStore


@pytest.fixture
def marks(stack: Stack) -> WriteMarks:
    return WriteMarks.from_url(stack.settings.redis_url, f"c_{uuid.uuid4().hex[:8]}")


def test_marks_only_move_forward(marks: WriteMarks) -> None:
    assert marks.last() is None
    marks.mark(1_800_000_000.25)
    marks.mark(1_700_000_000.0)  # a slower writer reporting late must not move it back
    assert marks.last() == 1_800_000_000.25
    before = time.time()
    other = WriteMarks(marks.r, "other")
    other.mark()
    assert marks.last() == 1_800_000_000.25  # per collection
    assert (other.last() or 0) >= before


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
