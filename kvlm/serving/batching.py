"""A batching queue: concurrent requests to one signature are merged into one call.

A batch closes when it holds `max_batch_size` examples or when its oldest request
has waited `batch_timeout_micros`; `num_batch_threads` batches run at once. When
`allowed_batch_sizes` is set, a batch is padded (repeating its last example) up to
the next allowed size, and the padding is dropped from the outputs. If a merged
batch fails with INVALID_ARGUMENT (e.g. one corrupt image), it is split in halves
and retried until the bad request is alone, so only that request fails.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future

import grpc
import numpy as np

from kvlm.serving.config import BatchingConfig
from kvlm.serving.errors import ServingError, exhausted

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class BatchStats:
    """Counts of executed batches and their sizes (real examples, without padding)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.batches = 0
        self.examples = 0
        self.requests = 0
        self.run_seconds = 0.0
        self.sizes: collections.Counter[int] = collections.Counter()

    def record(self, requests: int, examples: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.run_seconds += seconds
            self.requests += requests
            self.examples += examples
            self.sizes[examples] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "examples": self.examples,
                "max_batch_size": max(self.sizes, default=0),
                "mean_batch_size": self.examples / self.batches if self.batches else 0.0,
                "run_seconds": self.run_seconds,
                "batch_sizes": dict(sorted(self.sizes.items())),
            }


class _Task:
    __slots__ = ("inputs", "size", "future", "enqueued")

    def __init__(self, inputs: Arrays, size: int):
        self.inputs = inputs
        self.size = size
        self.future: Future = Future()
        self.enqueued = time.monotonic()


def _pad(inputs: Arrays, size: int, target: int) -> Arrays:
    if target == size:
        return inputs
    return {k: np.concatenate([v, np.repeat(v[-1:], target - size, axis=0)]) for k, v in inputs.items()}


class Batcher:
    """Merges requests for one signature. `run(inputs) -> outputs` executes a batch.

    `submit` returns a future resolving to `(outputs, batch_size)`, where `batch_size`
    is the number of examples in the batch the request ran in. `on_batch(size)` is
    called after each batch that ran.
    """

    def __init__(
        self, run: Callable[[Arrays], Mapping[str, np.ndarray]], config: BatchingConfig, name: str = "batcher",
        on_batch: Callable[[int], None] | None = None,
    ):
        self._run = run
        self._on_batch = on_batch
        self.config = config
        self.name = name
        self.stats = BatchStats()
        self._pending: collections.deque[_Task] = collections.deque()
        self._pending_examples = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(config.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Arrays, size: int) -> Future:
        """Queues one request of `size` examples."""
        task = _Task(inputs, size)
        limit = self.config.max_enqueued_batches * self.config.max_batch_size
        with self._cond:
            if self._closed:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, f"{self.name} is shutting down.")
            if self._pending_examples + size > limit:
                raise exhausted(
                    f"The batching queue of {self.name} is full ({self._pending_examples} examples waiting, "
                    f"max_enqueued_batches={self.config.max_enqueued_batches}); retry later."
                )
            self._pending.append(task)
            self._pending_examples += size
            self._cond.notify()
        return task.future

    def close(self, timeout: float = 10.0) -> None:
        """Runs what is queued, then stops the batch threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _take(self) -> list[_Task] | None:
        """Waits for a batch to close and removes its tasks from the queue."""
        max_size = self.config.max_batch_size
        timeout = self.config.batch_timeout_micros / 1e6
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return None
                first = self._pending[0]
                while (
                    self._pending_examples < max_size and not self._closed
                    and self._pending and self._pending[0] is first
                ):
                    left = first.enqueued + timeout - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                # Another thread may have taken `first`: then wait for the new oldest task.
                if self._pending and (
                    self._closed
                    or self._pending_examples >= max_size
                    or time.monotonic() >= self._pending[0].enqueued + timeout
                ):
                    break
            tasks, total = [], 0
            while self._pending and (not tasks or total + self._pending[0].size <= max_size):
                task = self._pending.popleft()
                self._pending_examples -= task.size
                if task.future.set_running_or_notify_cancel():
                    tasks.append(task)
                    total += task.size
            if self._pending:
                self._cond.notify()
            return tasks

    def _work(self) -> None:
        while True:
            tasks = self._take()
            if tasks is None:
                return
            if tasks:
                self._execute(tasks)

    def _execute(self, tasks: list[_Task]) -> None:
        size = sum(t.size for t in tasks)
        start = time.perf_counter()
        try:
            outputs = self._run_batch([t.inputs for t in tasks], size)
        except ServingError as error:
            if error.code == grpc.StatusCode.INVALID_ARGUMENT and len(tasks) > 1:
                # Find the request(s) at fault by halving: k bad requests cost O(k log n) runs.
                middle = len(tasks) // 2
                self._execute(tasks[:middle])
                self._execute(tasks[middle:])
                return
            for task in tasks:
                task.future.set_exception(error)
            return
        except Exception as error:  # a bug must not kill the batch thread
            logger.exception("Batch failed in %s", self.name)
            for task in tasks:
                task.future.set_exception(ServingError(grpc.StatusCode.INTERNAL, f"Batch failed: {error}"))
            return
        self.stats.record(len(tasks), size, time.perf_counter() - start)
        if self._on_batch is not None:
            self._on_batch(size)
        offset = 0
        for task in tasks:
            end = offset + task.size
            task.future.set_result(({k: v[offset:end] for k, v in outputs.items()}, size))
            offset = end

    def _run_batch(self, parts: list[Arrays], size: int) -> Arrays:
        if len(parts) == 1:
            inputs = parts[0]
        else:
            inputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        padded = next((s for s in self.config.allowed_batch_sizes if s >= size), size)
        outputs = self._run(_pad(inputs, size, padded))
        result = {}
        for name, value in outputs.items():
            value = np.asarray(value)
            if value.ndim == 0 or value.shape[0] != padded:
                raise ServingError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Output '{name}' has shape {list(value.shape)} without the batch dimension "
                    f"({padded}); batching needs every output to keep it.",
                )
            result[name] = value[:size]
        return result
