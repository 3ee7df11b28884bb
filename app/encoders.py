"""The model's encodes as the routes use them: batched on the model worker, repeated texts and labels cached."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model import CLIPInference, label_prompts, template_ensemble, templates_or_default

from .metrics import ServiceMetrics
from .model_worker import ModelWorker

if TYPE_CHECKING:  # only a service told to serve an ONNX export imports onnxruntime
    from interop.onnx_runtime import OnnxEncoder

TEXT_CHUNK = 256  # texts per ONNX run, as CLIPInference.embed_texts chunks its torch runs


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


def _split_rows(emb: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Consecutive row blocks of the given sizes: each request's share of one batched forward pass."""
    return np.split(emb, np.cumsum(sizes)[:-1]) if sizes else []


class Encoders:
    """Text, image and label embeddings; concurrent requests share forward passes, repeats come from the cache.

    With `onnx` (an export of the same checkpoint) the forward passes run in onnxruntime; the
    tokenizer and the image preprocessing stay the checkpoint's, so the inputs are the same.
    """

    def __init__(
        self, clip: CLIPInference, worker: ModelWorker, *, cache_size: int, metrics: ServiceMetrics | None = None,
        onnx: OnnxEncoder | None = None,
    ) -> None:
        self.clip = clip
        self.onnx = onnx
        self.metrics = metrics
        self.text_cache = LRUCache(cache_size)
        self.label_cache = LRUCache(cache_size)
        self.texts = worker.batcher("text", self._embed_text_groups)
        self.images = worker.batcher("image", self._embed_pixel_groups)

    # ------------------------------------------------------------------ batch functions (model thread)
    @property
    def runtime(self) -> str:
        """What runs the forward passes: "torch" or "onnxruntime"."""
        return "torch" if self.onnx is None else "onnxruntime"

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        if self.onnx is None:
            return self.clip.embed_texts(texts)
        out = [np.zeros((0, self.clip.dim), dtype=np.float32)]
        for start in range(0, len(texts), TEXT_CHUNK):
            out.append(self.onnx.encode_texts(self.clip.tokenizer.encode(texts[start : start + TEXT_CHUNK])))
        return np.concatenate(out)

    def _encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return self.clip.embed_pixels(pixels) if self.onnx is None else self.onnx.encode_images(pixels)

    def _embed_text_groups(self, groups: list[list[str]]) -> list[np.ndarray]:
        flat = [text for group in groups for text in group]
        return _split_rows(self._encode_texts(flat), [len(group) for group in groups])

    def _embed_pixel_groups(self, groups: list[torch.Tensor]) -> list[np.ndarray]:
        return _split_rows(self._encode_pixels(torch.cat(groups)), [g.shape[0] for g in groups])

    # ------------------------------------------------------------------ the encodes routes call
    def _count(self, hits: int, misses: int) -> None:
        if self.metrics is not None:
            if hits:
                self.metrics.cache.labels("hit").inc(hits)
            if misses:
                self.metrics.cache.labels("miss").inc(misses)

    async def _through_cache(
        self, cache: LRUCache, keys: Sequence[Hashable], compute: Callable[[list[Any]], Awaitable[np.ndarray]],
    ) -> list[np.ndarray]:
        """Cached rows for the keys; the missing ones (each once) computed together and cached."""
        rows: list[np.ndarray | None] = [cache.get(key) for key in keys]
        missing = list(dict.fromkeys(key for key, row in zip(keys, rows) if row is None))
        self._count(len(keys) - sum(row is None for row in rows), len(missing))
        if missing:
            found = dict(zip(missing, await compute(missing)))
            for key, vec in found.items():
                cache.put(key, vec)
            rows = [found[key] if row is None else row for key, row in zip(keys, rows)]
        return rows  # type: ignore[return-value]

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) normalised embeddings; repeated texts come from the LRU cache."""
        rows = await self._through_cache(
            self.text_cache, texts, lambda missing: self.texts.submit(missing, weight=len(missing))
        )
        if not rows:
            return np.zeros((0, self.clip.dim), dtype=np.float32)
        return np.stack(rows)

    async def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None) -> np.ndarray:
        """One prompt-ensemble embedding per label (model.zeroshot), cached per (label, templates)."""
        key_t = tuple(templates) if templates else None

        async def ensemble(missing: list[tuple[str, tuple[str, ...] | None]]) -> np.ndarray:
            # the prompts go through the text batcher, so they share a forward pass with other requests
            prompts = label_prompts([label for label, _ in missing], templates_or_default(templates))
            return template_ensemble(await self.texts.submit(prompts, weight=len(prompts)), len(missing))

        return np.stack(await self._through_cache(self.label_cache, [(label, key_t) for label in labels], ensemble))

    async def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed (B, 3, S, S) images -> (B, D), coalesced with other requests' images."""
        return await self.images.submit(pixels, weight=int(pixels.shape[0]))
