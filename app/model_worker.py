"""The model worker: the one thread that runs every forward pass, index search and index write.

torch and FAISS already use every core inside one call, so two jobs at once only make both
slower; and with the index's writes on the same thread, a search never runs beside a commit.
"""

from __future__ import annotations

import asyncio
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
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipforge-model")
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.metrics = metrics
        self.in_flight = in_flight
        self._batchers: list[MicroBatcher[Any, Any]] = []

    def batcher(self, name: str, fn: Callable[[list[T]], Sequence[R]]) -> MicroBatcher[T, R]:
        """A batched job on the model thread (create every batcher before `start`)."""
        batcher: MicroBatcher[T, R] = MicroBatcher(
            name, fn, self.executor, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
            metrics=self.metrics, in_flight=self.in_flight,
        )
        self._batchers.append(batcher)
        return batcher

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """One unbatched job on the model thread (index writes and reloads)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def start(self) -> None:
        for batcher in self._batchers:
            batcher.start()

    async def stop(self) -> None:
        """Finish every batch already submitted, then end the thread."""
        for batcher in self._batchers:
            await batcher.stop()
        self.executor.shutdown(wait=True)
