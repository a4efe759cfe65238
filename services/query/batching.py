"""One thread for every forward pass of the query process; concurrent text queries share one.

Measured reasons, on a 2-core CPU:
- The text tower is bound by reading its weights (~75 MB in bfloat16 for ViT-B/32), not by
  arithmetic: eight queries in one pass cost little more than one. Each pass takes every
  text waiting at that moment, so a lone query never waits for company (and, with
  CLIP_TEXT_QUANT's int8 copy of the tower, reads half the bytes: 3.9 ms against 6.4).
- torch's OpenMP threads belong to the thread that calls into torch. Passes run from several
  threads (the web server's pool) keep several thread teams spinning against each other: a
  query took 12-16 ms that way against 7 ms from a single thread.
- Several queries at once mean the other processes (gateway, Milvus) are busy too: a
  two-thread team then waits on a thread the OS has parked elsewhere, so passes of more
  than one text use one thread (8 clients through the gateway: 92 QPS with two threads,
  114 with one); a lone query keeps every thread (6.7 ms against 9.4 ms with one).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import numpy as np
import torch

from shared.errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()


class ModelBusy(Unavailable):
    """The model thread already has MODEL_QUEUE_SIZE calls waiting."""

    code = "model_busy"
    headers = {"Retry-After": "1"}


class ModelRunner:
    """Runs callables and batched text encodes on one long-lived thread, in arrival order.

    At most `max_queue` calls wait for the thread (one more is ModelBusy, at once), and a
    caller waits at most its deadline (then DeadlineExceeded; a call not yet started is
    dropped, one already running finishes unheard)."""

    def __init__(self, *, max_batch: int = 32, max_queue: int = 1024) -> None:
        self.encode_texts: Callable[[Sequence[str]], np.ndarray] | None = None
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._waiting = 0  # items put and not yet taken by the model thread
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()
        self.batches = 0  # text passes run, for tests and metrics
        self.largest = 0
        self.solo_threads = torch.get_num_threads()

    def call(self, fn: Callable[[], T], *, timeout_s: float | None = None) -> T:
        """fn() run on the model thread; its result or its exception."""
        future: Future[T] = Future()
        self._put(("call", fn, future))
        return _wait(future, timeout_s)

    def encode_text(self, text: str, *, timeout_s: float = 60.0) -> np.ndarray:
        """The unit vector for one text, computed together with whatever else is waiting."""
        if self.encode_texts is None:
            raise RuntimeError("no text encoder yet")
        future: Future[np.ndarray] = Future()
        self._put(("text", text, future))
        return _wait(future, timeout_s)

    def _put(self, item: tuple[str, Any, Future[Any]]) -> None:
        with self._lock:
            if self._waiting >= self._max_queue:
                raise ModelBusy(f"{self._waiting} model calls are waiting already; retry shortly")
            self._waiting += 1
        self._queue.put(item)

    def _take(self, item: Any) -> Any:
        if item is not _STOP:
            with self._lock:
                self._waiting -= 1
        return item

    def close(self) -> None:
        """Stop after the work already queued."""
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        later: list[Any] = []  # calls met while gathering texts, run after that pass
        while True:
            item = later.pop(0) if later else self._take(self._queue.get())
            if item is _STOP:
                return
            if item[0] == "call":
                _, fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
                continue
            texts = [item]
            while len(texts) < self._max_batch and not later:
                try:
                    nxt = self._take(self._queue.get_nowait())
                except queue.Empty:
                    break
                if nxt is not _STOP and nxt[0] == "text":
                    texts.append(nxt)
                else:
                    later.append(nxt)
            self._text_pass(texts)

    def _text_pass(self, batch: list[tuple[str, str, Future[np.ndarray]]]) -> None:
        live = [(text, fut) for _, text, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        unique = list(dict.fromkeys(text for text, _ in live))
        threads = self.solo_threads if len(unique) == 1 else 1
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        try:
            assert self.encode_texts is not None
            vectors = self.encode_texts(unique)
        except Exception as exc:  # every waiting caller gets the error, the thread lives on
            log.exception("text batch of %d failed", len(unique))
            for _, fut in live:
                fut.set_exception(exc)
            return
        self.batches += 1
        self.largest = max(self.largest, len(unique))
        row = {text: i for i, text in enumerate(unique)}
        for text, fut in live:
            fut.set_result(vectors[row[text]])


def _wait(future: Future[T], timeout_s: float | None) -> T:
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        future.cancel()  # skipped if the model thread has not started it
        raise DeadlineExceeded(
            f"the model did not answer within {timeout_s} s", code="model_timeout"
        ) from None
