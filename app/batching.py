"""Dynamic micro-batching: concurrent requests' encodes are coalesced into one forward pass.

Requests submit work to a `MicroBatcher`; its collector task takes whatever is queued (waiting at
most `max_wait_ms` from the first item's arrival for the batch to fill, up to `max_batch_size`
items) and runs the batch in one worker thread, off the event loop. All model and index work
shares that one thread: torch and FAISS already use every core inside one call, so running two
forward passes at once only makes both slower.

With batching off the same path runs with a batch size of one: batch-1 serving, as a baseline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from model import DEFAULT_TEMPLATES, CLIPInference
from model.inference import label_prompts, template_ensemble

from .metrics import ServiceMetrics

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    weight: int
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    """Coalesces submitted items into batches for `fn(items) -> results` (one result per item, in order).

    An item's weight is how many rows it adds to the batch (a request with 6 texts weighs 6); an item
    heavier than max_batch_size runs alone. `in_flight` (requests the server is handling) lets a batch
    start without waiting when every in-flight request is already queued: nobody else could join it,
    so a lone request never pays the wait.
    """

    def __init__(
        self, name: str, fn: Callable[[list[T]], Sequence[R]], executor: ThreadPoolExecutor,
        max_batch_size: int, max_wait_ms: float, metrics: ServiceMetrics | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.executor = executor
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.metrics = metrics
        self.in_flight = in_flight
        self._pending: deque[_Pending[T, R]] = deque()
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
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, max(1, weight), future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    # ------------------------------------------------------------------ collector
    def _queued_weight(self) -> int:
        return sum(p.weight for p in self._pending)

    async def _fill(self) -> None:
        """Wait (bounded by max_wait from the oldest item's arrival) while the batch is not full."""
        assert self._wakeup is not None
        deadline = self._pending[0].enqueued + self.max_wait
        while not self._stopping and self._queued_weight() < self.max_batch_size:
            if self.in_flight is not None and len(self._pending) >= self.in_flight():
                return
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending[T, R]]:
        batch = [self._pending.popleft()]
        total = batch[0].weight
        while self._pending and total + self._pending[0].weight <= self.max_batch_size:
            total += self._pending[0].weight
            batch.append(self._pending.popleft())
        return batch

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
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
            except Exception as exc:  # every waiting request gets the error, the collector lives on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)


class LRUCache:
    """A small thread-safe LRU map (text -> embedding); size 0 keeps nothing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Encoders:
    """The model's encodes as the routes use them: batched, cached, never on the event loop."""

    def __init__(
        self, clip: CLIPInference, max_batch_size: int, max_wait_ms: float, cache_size: int,
        metrics: ServiceMetrics | None = None, in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.clip = clip
        self.metrics = metrics
        self.in_flight = in_flight
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipforge-model")
        self.text_cache = LRUCache(cache_size)
        self.label_cache = LRUCache(cache_size)
        self.texts = MicroBatcher(
            "text", self._embed_text_groups, self.executor, max_batch_size, max_wait_ms, metrics, in_flight
        )
        self.images = MicroBatcher(
            "image", self._embed_pixel_groups, self.executor, max_batch_size, max_wait_ms, metrics, in_flight
        )
        self.searchers: list[MicroBatcher[Any, Any]] = []

    # ------------------------------------------------------------------ batch functions (worker thread)
    def _embed_text_groups(self, groups: list[list[str]]) -> list[np.ndarray]:
        flat = [text for group in groups for text in group]
        emb = self.clip.embed_texts(flat)
        out, start = [], 0
        for group in groups:
            out.append(emb[start : start + len(group)])
            start += len(group)
        return out

    def _embed_pixel_groups(self, groups: list[torch.Tensor]) -> list[np.ndarray]:
        emb = self.clip.embed_pixels(torch.cat(groups))
        out, start = [], 0
        for group in groups:
            out.append(emb[start : start + group.shape[0]])
            start += group.shape[0]
        return out

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for batcher in (self.texts, self.images, *self.searchers):
            batcher.start()

    async def stop(self) -> None:
        for batcher in (self.texts, self.images, *self.searchers):
            await batcher.stop()
        self.executor.shutdown(wait=True)

    def batcher(self, name: str, fn: Callable[[list[T]], Sequence[R]]) -> MicroBatcher[T, R]:
        """Another batched job on the model thread (the index search uses this)."""
        batcher: MicroBatcher[T, R] = MicroBatcher(
            name, fn, self.executor, self.texts.max_batch_size, self.texts.max_wait * 1000.0, self.metrics,
            self.in_flight,
        )
        self.searchers.append(batcher)
        return batcher

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """One unbatched job on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ the encodes routes call
    def _count(self, hits: int, misses: int) -> None:
        if self.metrics is not None:
            if hits:
                self.metrics.cache.labels("hit").inc(hits)
            if misses:
                self.metrics.cache.labels("miss").inc(misses)

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) normalised embeddings; repeated texts come from the LRU cache."""
        rows: list[np.ndarray | None] = [self.text_cache.get(t) for t in texts]
        missing = list(dict.fromkeys(t for t, row in zip(texts, rows) if row is None))
        self._count(len(texts) - sum(row is None for row in rows), len(missing))
        if missing:
            emb = await self.texts.submit(missing, weight=len(missing))
            found = dict(zip(missing, emb))
            for text, vec in found.items():
                self.text_cache.put(text, vec)
            rows = [found[t] if row is None else row for t, row in zip(texts, rows)]
        if not rows:
            return np.zeros((0, self.clip.dim), dtype=np.float32)
        return np.stack(rows)  # type: ignore[arg-type]

    async def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None) -> np.ndarray:
        """One prompt-ensemble embedding per label, cached per (label, templates)."""
        key_t = tuple(templates) if templates else None
        rows: list[np.ndarray | None] = [self.label_cache.get((label, key_t)) for label in labels]
        missing = list(dict.fromkeys(label for label, row in zip(labels, rows) if row is None))
        self._count(len(labels) - sum(row is None for row in rows), len(missing))
        if missing:
            found = dict(zip(missing, await self._ensemble(missing, key_t or DEFAULT_TEMPLATES)))
            for label, vec in found.items():
                self.label_cache.put((label, key_t), vec)
            rows = [found[label] if row is None else row for label, row in zip(labels, rows)]
        return np.stack(rows)  # type: ignore[arg-type]

    async def _ensemble(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """The prompts go through the text batcher (coalesced with other requests), then average per label.

        Same arithmetic as CLIPInference.label_embeddings: the mean over templates, renormalised.
        """
        prompts = label_prompts(labels, templates)
        return template_ensemble(await self.texts.submit(prompts, weight=len(prompts)), len(labels))

    async def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed (B, 3, S, S) images -> (B, D), coalesced with other requests' images."""
        return await self.images.submit(pixels, weight=int(pixels.shape[0]))
