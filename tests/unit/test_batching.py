"""The model thread: concurrent text queries share forward passes, each caller still gets
its own vector, and other calls run on the same thread in turn."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.query.batching import ModelRunner


def fake_vectors(texts: Sequence[str]) -> np.ndarray:
    return np.array([[len(t), sum(map(ord, t))] for t in texts], dtype=np.float32)


class Gated:
    """An encoder whose first pass waits until released, so later queries pile up."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(10)
        return fake_vectors(texts)


def runner(encode: object, **kw: int) -> ModelRunner:
    r = ModelRunner(**kw)
    r.encode_texts = encode  # type: ignore[assignment]
    return r


def test_waiting_queries_share_one_pass_and_get_their_own_vectors() -> None:
    model = Gated()
    batcher = runner(model, max_batch=32)
    texts = [f"query number {i}" for i in range(6)] + ["query number 2"]
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.encode_text, "the first")
        assert model.entered.wait(10)
        rest = [pool.submit(batcher.encode_text, t) for t in texts]
        while batcher._queue.qsize() < len(texts):  # all queued behind the running pass
            threading.Event().wait(0.01)
        model.release.set()
        assert np.array_equal(first.result(10), fake_vectors(["the first"])[0])
        for text, future in zip(texts, rest, strict=True):
            assert np.array_equal(future.result(10), fake_vectors([text])[0])
    batcher.close()
    assert model.calls[0] == ["the first"]
    assert len(model.calls) == 2  # the seven waiting queries went through together
    assert sorted(model.calls[1]) == sorted(set(texts))  # the repeated text encoded once


def test_a_lone_query_does_not_wait_for_company() -> None:
    batcher = runner(fake_vectors)
    for i in range(3):
        assert batcher.encode_text(f"t{i}", timeout_s=5)[0] == 2
    assert batcher.batches == 3 and batcher.largest == 1
    batcher.close()


def test_batches_are_capped() -> None:
    model = Gated()
    batcher = runner(model, max_batch=3)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.encode_text, "first")
        assert model.entered.wait(10)
        rest = [pool.submit(batcher.encode_text, f"t{i}") for i in range(7)]
        while batcher._queue.qsize() < 7:
            threading.Event().wait(0.01)
        model.release.set()
        first.result(10)
        [f.result(10) for f in rest]
    batcher.close()
    assert [len(c) for c in model.calls] == [1, 3, 3, 1]


def test_a_failing_pass_fails_its_callers_and_the_next_pass_works() -> None:
    fail = {"on": True}

    def flaky(texts: Sequence[str]) -> np.ndarray:
        if fail["on"]:
            raise RuntimeError("model exploded")
        return fake_vectors(texts)

    batcher = runner(flaky)
    with pytest.raises(RuntimeError, match="model exploded"):
        batcher.encode_text("a", timeout_s=5)
    fail["on"] = False
    assert batcher.encode_text("abc", timeout_s=5)[0] == 3
    batcher.close()


def test_calls_run_on_the_model_thread_between_text_passes() -> None:
    model = Gated()
    batcher = runner(model)
    threads: set[str] = set()

    def note() -> str:
        threads.add(threading.current_thread().name)
        return "ran"

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.encode_text, "first")
        assert model.entered.wait(10)
        text = pool.submit(batcher.encode_text, "second")
        call = pool.submit(batcher.call, note)
        while batcher._queue.qsize() < 2:
            threading.Event().wait(0.01)
        model.release.set()
        assert call.result(10) == "ran" and text.result(10)[0] == len("second")
        first.result(10)
    with pytest.raises(ZeroDivisionError):
        batcher.call(lambda: 1 / 0)
    assert batcher.call(lambda: threading.current_thread().name) == "model"
    assert threads == {"model"}
    batcher.close()
