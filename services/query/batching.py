"""Concurrent text queries coalesced into one forward pass.

On a CPU the text tower is bound by reading its weights (~150 MB in float32 for ViT-B/32),
not by arithmetic: one query costs about as much as eight. One thread runs the model; each
pass takes every query waiting at that moment, so a lone query never waits for company and
a crowd shares the weight reads.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

log = logging.getLogger(__name__)


class TextBatcher:
    """Runs `encode` over batches of the texts that callers of `encode_one` are waiting on."""

    def __init__(
        self, encode: Callable[[Sequence[str]], np.ndarray], *, max_batch: int = 32
    ) -> None:
        self._encode = encode
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[str, Future[np.ndarray]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="text-batcher", daemon=True)
        self._thread.start()
        self.batches = 0  # forward passes run, for tests and metrics
        self.largest = 0

    def encode_one(self, text: str, *, timeout_s: float = 60.0) -> np.ndarray:
        """The unit vector for one text, computed with whatever else is waiting."""
        future: Future[np.ndarray] = Future()
        self._queue.put((text, future))
        return future.result(timeout=timeout_s)

    def close(self) -> None:
        """Stop the model thread after the queries already waiting."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._pass(batch)
            if stop:
                return

    def _pass(self, batch: list[tuple[str, Future[np.ndarray]]]) -> None:
        live = [(text, fut) for text, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        unique = list(dict.fromkeys(text for text, _ in live))
        try:
            vectors = self._encode(unique)
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
