"""The application factory: `create_app(settings)` wires settings, state, middleware, errors and routers.

Start-up loads the checkpoint (and the index, when configured) and starts the micro-batchers;
shutdown, which uvicorn runs after in-flight requests have drained, finishes queued batches and
closes the index.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from model import PRESETS, CLIPInference, preset_config

from .batching import Encoders
from .dependencies import ServiceState
from .errors import install_error_handlers
from .middleware import BodyLimitMiddleware, RequestContextMiddleware
from .routers import classify, embed, images, search, similarity, system
from .settings import Settings

log = logging.getLogger("clipforge.app")
STATIC_DIR = Path(__file__).resolve().parent / "static"
VERSION = "0.1.0"

_TAGS = [
    {"name": "classify", "description": "Zero-shot classification"},
    {"name": "search", "description": "Text-to-image and image-to-image retrieval over the index"},
    {"name": "similarity", "description": "Image-text similarity"},
    {"name": "embed", "description": "Embeddings for other programs"},
    {"name": "images", "description": "The indexed images: fetch, add (API key), delete (API key)"},
    {"name": "system", "description": "Model card, health, readiness and metrics"},
]


def _preset_name(clip: CLIPInference) -> str:
    """The named preset whose config the checkpoint matches, or 'custom'."""
    stored = clip.meta.get("preset")
    if isinstance(stored, str) and stored:
        return stored
    cfg = clip.model.cfg.to_dict()
    for name in PRESETS:
        if preset_config(name).to_dict() == cfg:
            return name
    return "custom"


def _search_batch(index: Any) -> Any:
    """One index search for a batch of queries: the largest k, then each query's own k and min_score."""

    def run(items: Sequence[tuple[np.ndarray, int, float | None]]) -> list[list[Any]]:
        vectors = np.ascontiguousarray(np.stack([vec for vec, _, _ in items]), dtype=np.float32)
        k_max = max(k for _, k, _ in items)
        found = index.search_by_vector(vectors, k_max)
        return [
            [hit for hit in hits if min_score is None or hit.score >= min_score][:k]
            for hits, (_, k, min_score) in zip(found, items)
        ]

    return run


def _document_limits(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write this server's configured limits into the schema, so clients and fuzzers see the real bounds."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            for param in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if param.get("name") == "k":
                    param["schema"].update(minimum=1, maximum=settings.max_k)
                elif param.get("name") == "q":
                    param["schema"].update(minLength=1, maxLength=settings.max_text_chars)
    components = schema.get("components", {}).get("schemas", {})
    for name, field, count in (("Body_classify", "labels", settings.max_labels), ("Body_similarity", "texts", settings.max_texts),
                               ("EmbedTextRequest", "texts", settings.max_texts)):
        prop = components.get(name, {}).get("properties", {}).get(field)
        if prop is not None:
            prop["maxItems"] = count
            prop.setdefault("items", {}).update(minLength=1, maxLength=settings.max_text_chars)
    for name in ("Body_search_by_image",):
        prop = components.get(name, {}).get("properties", {}).get("k")
        if prop is not None:
            prop.update(minimum=1, maximum=settings.max_k)
    return schema


def _mark_uploads_binary(schema: dict[str, Any]) -> dict[str, Any]:
    """File fields as `format: binary` too (OpenAPI 3.0 style), so generated clients type them as files."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("contentMediaType") == "application/octet-stream" and node.get("type") == "string":
                node["format"] = "binary"
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema.get("components", {}))
    return schema


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
        clip = CLIPInference.load(settings.checkpoint, device=settings.device, max_pixels=settings.max_pixels)
        state.preset = _preset_name(clip)
        state.default_labels = settings.default_labels() or clip.class_names
        state.clip = clip
        state.metrics.model_loaded.set(1)
        log.info("model loaded", extra={"model": clip.model_id, "preset": state.preset, "dim": clip.dim})
    if settings.index is not None and state.index is None:
        from index import ImageIndex  # only a service with an index needs the index package

        state.index = ImageIndex.open(settings.index, model_id=state.clip.model_id, mmap=False)
        _tune_faiss(settings)
        state.metrics.index_size.set(len(state.index))
        log.info("index opened", extra={"index": str(settings.index), "size": len(state.index)})


async def _follow_index(state: ServiceState, every_s: float) -> None:
    """Pick up generations committed by other processes (`clipforge index add`) while serving."""
    while True:
        await asyncio.sleep(every_s)
        if state.index is None or state.encoders is None:
            continue
        try:
            if await state.encoders.run(state.index.reload_if_changed):
                state.metrics.index_size.set(len(state.index))
                log.info("index reloaded", extra={"size": len(state.index)})
        except Exception:  # a half-written or unreadable generation: keep serving the old one
            log.exception("index reload failed; still serving the previous generation")


async def _start(state: ServiceState) -> None:
    await run_in_threadpool(load_service, state)
    assert state.clip is not None
    settings = state.settings
    metrics = state.metrics
    encoders = Encoders(state.clip, settings.effective_batch_size, settings.max_wait_ms, settings.text_cache_size,
                        metrics, in_flight=lambda: metrics.active)
    if state.index is not None:
        state.searcher = encoders.batcher("search", _search_batch(state.index))
    encoders.start()
    state.encoders = encoders
    if state.index is not None and settings.index_reload_s > 0:
        state.background.append(asyncio.create_task(_follow_index(state, settings.index_reload_s)))
    state.ready = True
    log.info("ready", extra={"batching": settings.batching, "max_batch_size": settings.effective_batch_size})


async def _stop(state: ServiceState) -> None:
    state.ready = False
    for task in state.background:
        task.cancel()
    await asyncio.gather(*state.background, return_exceptions=True)
    state.background.clear()
    if state.encoders is not None:
        await state.encoders.stop()
        state.encoders = None
    state.searcher = None
    if state.index is not None and hasattr(state.index, "close"):
        state.index.close()
    state.index = None
    log.info("stopped")


def create_app(settings: Settings) -> FastAPI:
    """A FastAPI app over one checkpoint (and optionally one index); nothing loads until start-up."""
    state = ServiceState(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _start(state)
        try:
            yield
        finally:
            await _stop(state)

    form_fields = max(settings.max_labels, settings.max_texts) + 16
    app = FastAPI(
        title="clipforge", version=VERSION, lifespan=lifespan, openapi_tags=_TAGS,
        description="CLIP embeddings, similarity, zero-shot classification and text-to-image search. "
                    "Every error is `{\"error\": {\"code\", \"message\"}}`.",
        form_limits={"max_fields": form_fields, "max_files": settings.max_images + 1,
                     "max_part_size": max(settings.max_text_chars * 4 + 1024, 64 * 1024)},
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"], expose_headers=["X-Request-ID"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    for module in (classify, search, similarity, embed, images, system):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_limits(_mark_uploads_binary(default_openapi()), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
