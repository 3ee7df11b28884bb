"""GET /info, /healthz, /readyz and /metrics: what is served, and whether it is up."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from model.checkpoint import model_origin

from ..dependencies import ClipDep, ReadyStateDep, StateDep, require_read_key
from ..errors import ApiError, error_responses
from ..schemas import Health, IndexInfo, InfoResponse, Readiness

router = APIRouter(tags=["system"])
_PUBLIC_INDEX_KEYS = ("dim", "metric", "params", "tombstones", "generation", "created", "updated", "size_bytes")


@router.get(
    "/info", operation_id="info", response_model=InfoResponse, dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 403, 503), summary="Model card",
)
async def info(state: ReadyStateDep, clip: ClipDep) -> InfoResponse:
    """Preset, config, checkpoint hash, embedding dim, stored evaluation metrics, index type and size, limits."""
    meta = clip.meta
    index_info = None
    if state.index is not None:
        raw = state.index.info()  # server paths (directory, root, checkpoint) stay private
        public = {key: raw[key] for key in _PUBLIC_INDEX_KEYS if key in raw}
        index_info = IndexInfo(size=len(state.index), type=raw.get("index_type"), **public)
        state.metrics.index_size.set(index_info.size)
    step = meta.get("step")
    return InfoResponse(
        preset=state.preset, model=clip.model_id, dim=clip.dim, config=clip.model.cfg.to_dict(),
        metrics=dict(meta.get("metrics") or {}), params=dict(meta.get("params") or {}),
        step=step if isinstance(step, int) else None, created=str(meta["created"]) if meta.get("created") else None,
        origin=model_origin(meta),
        logit_scale=clip.logit_scale, runtime=state.encoders.runtime,
        precision=clip.precision, default_labels=state.default_labels, index=index_info,
        batching={"enabled": state.settings.batching, "max_batch_size": state.settings.effective_batch_size,
                  "max_wait_ms": state.settings.max_wait_ms, "text_cache_size": state.settings.text_cache_size},
        limits={**state.settings.public_limits(), **state.limits.public(clip.tokenizer.max_length)},
    )


@router.get("/healthz", operation_id="healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """The process is up and answering (says nothing about the model)."""
    return Health(status="ok")


@router.get(
    "/readyz", operation_id="readyz", response_model=Readiness, responses=error_responses(503), summary="Readiness",
)
async def readyz(state: StateDep) -> Readiness:
    """200 once the model (and the index, when one is configured) is loaded and the model thread answers
    its heartbeat; 503 before start-up finished, during shutdown, and while the model thread is dead or hung."""
    model_ok = state.ready and state.clip is not None
    index_ok = state.index is not None
    if not model_ok or (state.settings.index is not None and not index_ok):
        raise ApiError(503, "not_ready", f"model loaded: {'yes' if model_ok else 'no'}; "
                       f"index loaded: {'yes' if index_ok else 'no'}")
    problem = state.worker.problem(state.limits.worker_stall_s) if state.worker is not None else "no model worker"
    if problem is not None:
        raise ApiError(503, "not_ready", problem)
    return Readiness(status="ready", model=model_ok, index=index_ok)


@router.get(
    "/metrics", operation_id="metrics", dependencies=[Depends(require_read_key)],
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
               **error_responses(401, 403)},
    response_class=Response, summary="Prometheus metrics",
)
async def metrics(state: StateDep) -> Response:
    """Request counts and latencies per route, batch sizes, queue wait, cache hits, index size."""
    if state.index is not None:
        state.metrics.index_size.set(len(state.index))
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
