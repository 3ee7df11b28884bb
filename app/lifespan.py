"""The service lifecycle: load the model (and index) at start-up, follow the index, drain at shutdown.

Shutdown runs after uvicorn has drained in-flight requests: queued batches finish, then the
index closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from model import PRESETS, CLIPInference, preset_config
from model.device import cpu_has_native_bf16
from model.errors import ClipforgeError

from .dependencies import ServiceState
from .encoders import Encoders
from .index_search import IndexSearcher
from .model_worker import ModelWorker
from .settings import Settings

if TYPE_CHECKING:
    from interop.onnx_runtime import OnnxEncoder

log = logging.getLogger("clipforge.app")


def preset_name(clip: CLIPInference) -> str:
    """The named preset whose config the checkpoint matches, or 'custom'."""
    stored = clip.meta.get("preset")
    if isinstance(stored, str) and stored:
        return stored
    cfg = clip.model.cfg.to_dict()
    for name in PRESETS:
        if preset_config(name).to_dict() == cfg:
            return name
    return "custom"


def _tune_faiss(settings: Settings) -> None:
    """FAISS threads follow the server's thread setting (its kernel choice is made per batch)."""
    import faiss

    if settings.threads is not None:
        faiss.omp_set_num_threads(settings.threads)


def load_service(state: ServiceState) -> None:
    """Load the checkpoint and open the index (idempotent); errors name what is wrong."""
    settings = state.settings
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if state.clip is None:
        clip = CLIPInference.load(settings.checkpoint, device=settings.device, max_pixels=settings.max_pixels,
                                  precision=settings.precision)
        if settings.precision == "bf16" and clip.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 forward passes will be slower than fp32")
        state.preset = preset_name(clip)
        state.default_labels = settings.default_labels() or clip.class_names
        state.clip = clip
        state.metrics.model_loaded.set(1)
        log.info("model loaded", extra={"model": clip.model_id, "preset": state.preset, "dim": clip.dim,
                                        "precision": clip.precision})
    if settings.onnx is not None and state.onnx is None:
        state.onnx = load_onnx(settings, state.clip)
    if settings.index is not None and state.index is None:
        # only a service with an index needs the index package; the setting names a FAISS folder, or a
        # location file naming a Milvus collection that every replica shares (index/locations.py)
        from index.locations import open_index

        state.index = open_index(settings.index, model_id=state.clip.model_id, mmap=settings.index_mmap)
        _tune_faiss(settings)
        state.metrics.index_size.set(len(state.index))
        log.info("index opened", extra={"index": str(settings.index), "size": len(state.index)})


async def _follow_index(state: ServiceState, every_s: float) -> None:
    """Pick up generations committed by other processes (`clipforge index add`) while serving."""
    while True:
        await asyncio.sleep(every_s)
        if state.index is None or state.worker is None:
            continue
        try:
            if await state.worker.run(state.index.reload_if_changed):
                state.metrics.index_size.set(len(state.index))
                log.info("index reloaded", extra={"size": len(state.index)})
        except Exception:  # a half-written or unreadable generation: keep serving the old one
            log.exception("index reload failed; still serving the previous generation")


def load_onnx(settings: Settings, clip: CLIPInference) -> OnnxEncoder:
    """The ONNX export to encode with; refused unless it was exported from this very checkpoint."""
    from interop.onnx_runtime import (
        OnnxEncoder,  # only an ONNX service imports onnxruntime
    )

    assert settings.onnx is not None
    encoder = OnnxEncoder(settings.onnx, threads=settings.threads)
    if encoder.model_id != clip.model_id:
        raise ClipforgeError(f"ONNX export {settings.onnx} is of checkpoint {encoder.model_id[:12]}, not of "
                             f"{settings.checkpoint} ({clip.model_id[:12]}): export this checkpoint with "
                             f"`clipforge model export {settings.checkpoint} --to onnx:DIR`")
    log.info("onnx export loaded", extra={"onnx": str(settings.onnx), "model": encoder.model_id})
    return encoder


async def start_service(state: ServiceState) -> None:
    """Load, then start the model worker's batchers; the service answers requests from here on."""
    await run_in_threadpool(load_service, state)
    assert state.clip is not None
    settings = state.settings
    metrics = state.metrics
    worker = ModelWorker(max_batch_size=settings.effective_batch_size, max_wait_ms=settings.max_wait_ms,
                         metrics=metrics, in_flight=lambda: metrics.active, max_queue=state.limits.max_queue,
                         heartbeat_s=state.limits.heartbeat_s)
    encoders = Encoders(state.clip, worker, cache_size=settings.text_cache_size, metrics=metrics, onnx=state.onnx)
    if state.index is not None:
        state.searcher = IndexSearcher(state.index, worker)
    worker.start()
    state.worker, state.encoders = worker, encoders
    if state.index is not None and settings.index_reload_s > 0:
        state.background.append(asyncio.create_task(_follow_index(state, settings.index_reload_s)))
    state.ready = True
    log.info("ready", extra={"batching": settings.batching, "max_batch_size": settings.effective_batch_size})


async def stop_service(state: ServiceState) -> None:
    """Refuse new work, finish queued batches, close the index."""
    state.ready = False
    for task in state.background:
        task.cancel()
    await asyncio.gather(*state.background, return_exceptions=True)
    state.background.clear()
    if state.worker is not None:
        await state.worker.stop()
    state.worker = state.encoders = state.searcher = None
    if state.index is not None:
        state.index.close()
    state.index = None
    log.info("stopped")


def lifespan(state: ServiceState) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """FastAPI's lifespan for this state: start_service before the first request, stop_service after the last."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        await start_service(state)
        try:
            yield
        finally:
            await stop_service(state)

    return run
