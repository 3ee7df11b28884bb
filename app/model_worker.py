"""The model worker: the one thread that runs every forward pass, index search and index write.

torch and FAISS already use every core inside one call, so two jobs at once only make both
slower; and with the index's writes on the same thread, a search never runs beside a commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .batching import MicroBatcher
from .metrics import ServiceMetrics

T = TypeVar("T")
R = TypeVar("R")


class ModelWorker:
    """Owns the model thread: batched jobs (encodes, searches) through `batcher`, one-off jobs through `run`."""

    def __init__(
        self, *, max_batch_size: int, max_wait_ms: float, metrics: ServiceMetrics | None = None,
        in_flight: Callable[[], int] | None = None, max_queue: int | None = None, heartbeat_s: float = 1.0,
    ) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipforge-model")
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.metrics = metrics
        self.in_flight = in_flight
        self.max_queue = max_queue
        self.heartbeat_s = heartbeat_s
        self._batchers: list[MicroBatcher[Any, Any]] = []
        self._beat_task: asyncio.Task[None] | None = None
        self._last_beat = time.monotonic()

    def batcher(self, name: str, fn: Callable[[list[T]], Sequence[R]]) -> MicroBatcher[T, R]:
        """A batched job on the model thread (create every batcher before `start`)."""
        batcher: MicroBatcher[T, R] = MicroBatcher(
            name, fn, self.executor, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
            metrics=self.metrics, in_flight=self.in_flight, max_queue=self.max_queue,
        )
        self._batchers.append(batcher)
        return batcher

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """One unbatched job on the model thread (index writes and reloads)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def start(self) -> None:
        for batcher in self._batchers:
            batcher.start()
        self._last_beat = time.monotonic()
        self._beat_task = asyncio.get_running_loop().create_task(self._heartbeat(), name="model-heartbeat")

    async def _heartbeat(self) -> None:
        """A no-op through the model thread every heartbeat_s: it completes only while the thread is alive and free."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self.executor, time.monotonic)
            except RuntimeError:  # the executor was shut down: there is no model thread any more
                return
            self._last_beat = time.monotonic()
            await asyncio.sleep(self.heartbeat_s)

    def problem(self, stall_s: float) -> str | None:
        """Why the worker cannot serve (its heartbeat stopped, a batcher died, the thread hung), or None."""
        if self._beat_task is None or self._beat_task.done():
            return "the model thread is not running"
        stopped = [b.name for b in self._batchers if not b.running]
        if stopped:
            return f"the {', '.join(stopped)} batcher is not running"
        silent = time.monotonic() - self._last_beat
        if silent > stall_s:
            return f"the model thread has not answered a heartbeat for {silent:.1f} s (the limit is {stall_s:g} s)"
        return None

    async def stop(self) -> None:
        """Finish every batch already submitted, then end the thread."""
        if self._beat_task is not None:
            self._beat_task.cancel()
            await asyncio.gather(self._beat_task, return_exceptions=True)
        for batcher in self._batchers:
            await batcher.stop()
        self.executor.shutdown(wait=True)
