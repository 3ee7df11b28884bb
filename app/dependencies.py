"""What routes depend on: the loaded service state, API-key checks, and input limits."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request, UploadFile
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from model import CLIPInference
from model.errors import ImageError

from .batching import Encoders, MicroBatcher
from .errors import ApiError, image_error, not_ready
from .metrics import ServiceMetrics
from .settings import Settings


@dataclass
class ServiceState:
    """Everything loaded at start-up; routes reach it through the dependencies below."""

    settings: Settings
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    clip: CLIPInference | None = None
    encoders: Encoders | None = None
    index: Any | None = None  # index.ImageIndex; typed loosely so the app starts without the index package
    searcher: MicroBatcher[Any, Any] | None = None
    default_labels: list[str] = field(default_factory=list)
    preset: str = "custom"
    ready: bool = False
    background: list[Any] = field(default_factory=list)  # asyncio tasks stopped at shutdown


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def ready_state(request: Request) -> ServiceState:
    """The state once the model is loaded; 503 before start-up finished or after shutdown began."""
    state: ServiceState = request.app.state.service
    if not state.ready or state.clip is None or state.encoders is None:
        raise not_ready("the model is not loaded yet (the service is starting or shutting down)")
    return state


def indexed_state(request: Request) -> ServiceState:
    """The state with an index; 503 when the service runs without one."""
    state = ready_state(request)
    if state.index is None or state.searcher is None:
        raise not_ready("this service has no index: start it with --index (CLIPFORGE_INDEX) to search and serve images")
    return state


# ---------------------------------------------------------------------- API keys
bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def _check_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    if not settings.api_keys:
        raise ApiError(403, "writes_disabled", "no API keys are configured; set CLIPFORGE_API_KEYS to allow writes")
    if credentials is None or not credentials.credentials:
        raise ApiError(401, "unauthorized", "an API key is required: send `Authorization: Bearer <key>`",
                       headers={"WWW-Authenticate": "Bearer"})
    given = credentials.credentials.encode("utf-8", "replace")
    matched = False
    for key in settings.api_keys:  # every key is compared, each in constant time
        matched |= hmac.compare_digest(given, key.get_secret_value().encode("utf-8"))
    if not matched:
        raise ApiError(403, "forbidden", "the API key is not valid")


def require_write_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    _check_key(get_state(request).settings, credentials)


def require_read_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    settings = get_state(request).settings
    if settings.protect_reads:
        _check_key(settings, credentials)


# ---------------------------------------------------------------------- input limits
def check_text(text: str, what: str, max_chars: int) -> str:
    """Non-empty, not over the length limit, no NUL or unpaired surrogates (invalid UTF-8 that slipped in)."""
    if not text.strip():
        raise ApiError(422, "invalid_text", f"{what} is empty")
    if len(text) > max_chars:
        raise ApiError(422, "text_too_long", f"{what} has {len(text):,} characters; the limit is {max_chars:,}")
    if "\x00" in text:
        raise ApiError(422, "invalid_text", f"{what} contains a NUL character")
    if "\ufffd" in text or any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ApiError(422, "invalid_text", f"{what} is not valid UTF-8")
    return text


def check_texts(texts: list[str], what: str, max_count: int, max_chars: int) -> list[str]:
    if not texts:
        raise ApiError(422, "missing_texts", f"at least one {what[:-1] if what.endswith('s') else what} is required")
    if len(texts) > max_count:
        raise ApiError(422, "too_many_texts", f"{len(texts):,} {what} given; the limit is {max_count:,}")
    return [check_text(t, f"{what}[{i}]", max_chars) for i, t in enumerate(texts)]


def check_k(k: int, settings: Settings) -> int:
    if k < 1 or k > settings.max_k:
        raise ApiError(422, "invalid_k", f"k must be between 1 and {settings.max_k}, got {k}")
    return k


async def read_image(state: ServiceState, upload: UploadFile) -> Any:
    """Uploaded file -> preprocessed (3, S, S) tensor, decoded off the event loop with the pixel guard."""
    assert state.clip is not None
    data = await upload.read()
    if not data:
        raise ApiError(422, "empty_image", f"uploaded file {upload.filename or 'image'!r} is empty")
    try:
        return await run_in_threadpool(state.clip.preprocess, data)
    except ImageError as exc:
        raise image_error(exc) from None
