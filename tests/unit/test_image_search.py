"""POST /v1/search/image in process: the header is checked before decoding, the model call
has a deadline, and the model thread's line is bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import services.query.main as query
from services.query.batching import ModelBusy, ModelRunner
from shared.errors import DeadlineExceeded
from shared.settings import Settings
from tests.images import encode, make_image


class SlowEncoder:
    """Stands in for the model: an image tower that takes `seconds`."""

    dim = 4

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def encode_images(self, images: list[Any]) -> np.ndarray:
        time.sleep(self.seconds)
        return np.ones((len(images), self.dim), dtype=np.float32) / 2


@pytest.fixture
def searcher() -> Iterator[query.Searcher]:
    settings = Settings(
        redis_url="redis://127.0.0.1:9/0",  # never reached: every case ends before a search
        model_timeout_s=0.2,
        model_queue_size=2,
        max_image_pixels=1_000_000,
    )
    s = query.Searcher(settings)
    s.encoder = SlowEncoder(0.0)  # type: ignore[assignment]
    query.app.state.searcher = s
    yield s
    s.close()


@pytest.fixture
def client(searcher: query.Searcher) -> TestClient:
    return TestClient(query.app)  # no lifespan: the searcher above is used as it is


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encode(make_image(41, size=(32, 32)), "ICO"), "unsupported_format"),
        (encode(make_image(42, size=(1100, 1000)), "PNG"), "image_too_large"),  # 1.1 MP
        (encode(make_image(43, size=(505, 5)), "PNG"), "image_too_large"),  # 101:1
        (b"not an image at all", "not_an_image"),
    ],
)
def test_refused_from_the_header_without_decoding(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, data: bytes, code: str
) -> None:
    decoded: list[int] = []
    from shared.ml.images import decode_image as real

    def spy(raw: bytes, *, max_pixels: int) -> Any:
        decoded.append(len(raw))
        return real(raw, max_pixels=max_pixels)

    monkeypatch.setattr(query, "decode_image", spy)
    answer = client.post("/v1/search/image", files={"file": ("q", data)})
    assert (answer.status_code, answer.json()["code"]) == (422, code)
    assert decoded == []


def test_a_slow_model_answers_504_at_the_deadline(
    client: TestClient, searcher: query.Searcher
) -> None:
    searcher.encoder = SlowEncoder(2.0)  # type: ignore[assignment]
    start = time.perf_counter()
    answer = client.post("/v1/search/image", files={"file": ("q.png", encode(make_image(44)))})
    assert (answer.status_code, answer.json()["code"]) == (504, "model_timeout")
    assert time.perf_counter() - start < 1.5


def test_a_full_model_line_answers_503_with_retry_after(
    client: TestClient, searcher: query.Searcher
) -> None:
    gate, entered = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(10)

    runner = searcher.runner
    holder = threading.Thread(target=lambda: runner.call(hold))
    holder.start()
    assert entered.wait(10)  # the model thread is busy; two calls may wait behind it
    waiting = [threading.Thread(target=lambda: runner.call(lambda: None)) for _ in range(2)]
    for t in waiting:
        t.start()
    while runner._waiting < 2:
        time.sleep(0.01)
    try:
        answer = client.post("/v1/search/image", files={"file": ("q.png", encode(make_image(45)))})
        assert (answer.status_code, answer.json()["code"]) == (503, "model_busy")
        assert answer.headers["Retry-After"] == "1"
    finally:
        gate.set()
        for t in [holder, *waiting]:
            t.join(10)
    assert runner._waiting == 0


def test_runner_deadline_drops_a_call_not_yet_started() -> None:
    runner = ModelRunner(max_queue=4)
    gate = threading.Event()
    ran: list[str] = []
    try:
        threading.Thread(target=lambda: runner.call(lambda: gate.wait(10))).start()
        time.sleep(0.05)
        with pytest.raises(DeadlineExceeded) as err:
            runner.call(lambda: ran.append("late"), timeout_s=0.1)
        assert (err.value.status_code, err.value.code) == (504, "model_timeout")
        gate.set()
        assert runner.call(lambda: "next", timeout_s=5) == "next"
        assert ran == []  # the abandoned call never ran
    finally:
        gate.set()
        runner.close()
    with pytest.raises(ModelBusy):
        full = ModelRunner(max_queue=0)
        try:
            full.call(lambda: None)
        finally:
            full.close()
