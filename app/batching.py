"""Dynamic micro-batching: concurrent requests' items are coalesced into one call.

Requests submit work to a `MicroBatcher`; its collector task takes whatever is queued (waiting at
most `max_wait_ms` from the first item's arrival for the batch to fill, up to `max_batch_size`
items) and runs the batch on an executor, off the event loop (in the service: the model worker's
one thread, app/model_worker.py).

With batching off the same path runs with a batch size of one: batch-1 serving, as a baseline.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .metrics import ServiceMetrics

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """A batcher's queue is at its bound: the request is refused at once rather than left waiting."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"the {name} queue is full ({limit:,} requests waiting); retry shortly")
        self.name = name
        self.limit = limit


@dataclass
class _QueuedItem(Generic[T, R]):
    """One submitted item waiting for its batch: its weight in rows, the future its submitter awaits."""

    item: T
    weight: int
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    """Coalesces submitted items into batches for `fn(items) -> results` (one result per item, in order).

    An item's weight is how many rows it adds to the batch (a request with 6 texts weighs 6); an item
    heavier than max_batch_size runs alone. `in_flight` (requests the server is handling) lets a batch
    start without waiting when every in-flight request is already queued: nobody else could join it,
    so a lone request never pays the wait. `max_queue` bounds the requests waiting (not counting the
    batch running): past it `submit` raises QueueFull at once.
    """

    def __init__(
        self, name: str, fn: Callable[[list[T]], Sequence[R]], executor: ThreadPoolExecutor, *,
        max_batch_size: int, max_wait_ms: float, metrics: ServiceMetrics | None = None,
        in_flight: Callable[[], int] | None = None, max_queue: int | None = None,
    ) -> None:
        self.name = name
        self.max_queue = max_queue
        self.fn = fn
        self.executor = executor
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.metrics = metrics
        self.in_flight = in_flight
        self._queue: deque[_QueuedItem[T, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Finish everything already submitted, then end the collector."""
        if self._task is None:
            return
        self._stopping = True
        assert self._wakeup is not None
        self._wakeup.set()
        await self._task
        self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ submit
    async def submit(self, item: T, weight: int = 1) -> R:
        if not self.running or self._stopping:
            raise RuntimeError(f"the {self.name} batcher is not running")
        if self.max_queue is not None and len(self._queue) >= self.max_queue:
            raise QueueFull(self.name, self.max_queue)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append(_QueuedItem(item, max(1, weight), future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    # ------------------------------------------------------------------ collector
    def _queued_weight(self) -> int:
        return sum(p.weight for p in self._queue)

    async def _fill(self) -> None:
        """Wait (bounded by max_wait from the oldest item's arrival) while the batch is not full."""
        assert self._wakeup is not None
        deadline = self._queue[0].enqueued + self.max_wait
        while not self._stopping and self._queued_weight() < self.max_batch_size:
            if self.in_flight is not None and len(self._queue) >= self.in_flight():
                return
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_QueuedItem[T, R]]:
        batch = [self._queue.popleft()]
        total = batch[0].weight
        while self._queue and total + self._queue[0].weight <= self.max_batch_size:
            total += self._queue[0].weight
            batch.append(self._queue.popleft())
        return batch

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_batch_size > 1 and self.max_wait > 0:
                await self._fill()
            batch = [p for p in self._take() if not p.future.done()]  # drop requests whose client left
            if not batch:
                continue
            started = time.perf_counter()
            if self.metrics is not None:
                self.metrics.batch_size.labels(self.name).observe(sum(p.weight for p in batch))
                for p in batch:
                    self.metrics.queue_wait.labels(self.name).observe(started - p.enqueued)
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name} batch returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the collector lives on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)
