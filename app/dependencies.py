"""What routes depend on: the loaded service state, API-key checks, and input limits.

Routes name what they use through the `...Dep` aliases below (`clip: ClipDep`); the ones that
need the model answer 503 until start-up has finished, the index ones 503 without an index.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import torch
from fastapi import Depends, Request, UploadFile
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from model import CLIPInference

from .decode import DecodeGate, ImageDecoder
from .encoders import Encoders
from .errors import ApiError, not_ready
from .index_search import IndexSearcher
from .limits import ServingLimits
from .metrics import ServiceMetrics
from .model_worker import ModelWorker
from .settings import Settings

if TYPE_CHECKING:  # only a service with an index imports the index package (and one serving ONNX onnxruntime)
    from index import ImageIndex
    from interop.onnx_runtime import OnnxEncoder


@dataclass
class ServiceState:
    """Everything loaded at start-up (app/lifespan.py); routes reach it through the dependencies below."""

    settings: Settings
    limits: ServingLimits = field(default_factory=ServingLimits)
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    clip: CLIPInference | None = None
    onnx: OnnxEncoder | None = None  # settings.onnx loaded: the forward passes run in onnxruntime
    worker: ModelWorker | None = None
    encoders: Encoders | None = None
    index: ImageIndex | None = None
    searcher: IndexSearcher | None = None
    default_labels: list[str] = field(default_factory=list)
    preset: str = "custom"
    ready: bool = False
    background: list[asyncio.Task[None]] = field(default_factory=list)  # stopped at shutdown
    decodes: DecodeGate | None = None  # the image decode budget; sized from the settings when not given
    max_decode_bytes: int = field(init=False, default=0)  # settings.decode_limit, resolved once

    def __post_init__(self) -> None:
        if self.decodes is None:
            self.decodes = DecodeGate(self.settings.decode_memory)
        self.max_decode_bytes = self.settings.decode_limit


# The dependencies are `async def` though none of them awaits: FastAPI runs a plain `def` dependency in
# the thread pool, a hop per dependency per request (docs/benchmarks.md, Service), and these only read
# attributes.
def _service(request: Request) -> ServiceState:
    return request.app.state.service


async def get_state(request: Request) -> ServiceState:
    return _service(request)


async def get_settings(request: Request) -> Settings:
    return _service(request).settings


async def get_metrics(request: Request) -> ServiceMetrics:
    return _service(request).metrics


async def ready_state(request: Request) -> ServiceState:
    """The state once the model is loaded; 503 before start-up finished or after shutdown began."""
    state = _service(request)
    if not state.ready or state.clip is None or state.worker is None or state.encoders is None:
        raise not_ready("the model is not loaded yet (the service is starting or shutting down)")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
ReadyStateDep = Annotated[ServiceState, Depends(ready_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


def _indexed(state: ServiceState) -> tuple[ImageIndex, IndexSearcher]:
    if state.index is None or state.searcher is None:
        raise not_ready("this service has no index: start it with --index (CLIPFORGE_INDEX) to search and serve images")
    return state.index, state.searcher


async def get_clip(state: ReadyStateDep) -> CLIPInference:
    assert state.clip is not None  # ready_state checked
    return state.clip


async def get_worker(state: ReadyStateDep) -> ModelWorker:
    assert state.worker is not None  # ready_state checked
    return state.worker


async def get_encoders(state: ReadyStateDep) -> Encoders:
    assert state.encoders is not None  # ready_state checked
    return state.encoders


async def get_index(state: ReadyStateDep) -> ImageIndex:
    """The index; 503 when the service runs without one."""
    return _indexed(state)[0]


async def get_searcher(state: ReadyStateDep) -> IndexSearcher:
    """The batched index search; 503 when the service runs without an index."""
    return _indexed(state)[1]


async def get_decoder(state: ReadyStateDep) -> ImageDecoder:
    """Image decoding priced from headers and held to the decode budget (app/decode.py)."""
    assert state.clip is not None and state.decodes is not None  # ready_state checked; __post_init__ set it
    return ImageDecoder(state.clip, state.decodes, state.max_decode_bytes)


ClipDep = Annotated[CLIPInference, Depends(get_clip)]
DecoderDep = Annotated[ImageDecoder, Depends(get_decoder)]
WorkerDep = Annotated[ModelWorker, Depends(get_worker)]
EncodersDep = Annotated[Encoders, Depends(get_encoders)]
IndexDep = Annotated["ImageIndex", Depends(get_index)]
SearcherDep = Annotated[IndexSearcher, Depends(get_searcher)]


# ---------------------------------------------------------------------- API keys
bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def bearer_credentials(authorization: str | None) -> HTTPAuthorizationCredentials | None:
    """`Authorization: Bearer <key>` as HTTPBearer reads it (None for a missing header or another scheme)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


def check_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    """401 without a key, 403 for a wrong one (or when no keys are configured)."""
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


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def require_write_key(settings: SettingsDep, credentials: BearerDep) -> None:
    check_key(settings, credentials)


async def require_read_key(settings: SettingsDep, credentials: BearerDep) -> None:
    if settings.protect_reads:
        check_key(settings, credentials)


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
        raise ApiError(422, "missing_texts", f"at least one {what.removesuffix('s')} is required")
    if len(texts) > max_count:
        raise ApiError(422, "too_many_texts", f"{len(texts):,} {what} given; the limit is {max_count:,}")
    return [check_text(t, f"{what}[{i}]", max_chars) for i, t in enumerate(texts)]


def prompt_sizes(labels: Sequence[str], templates: Sequence[str]) -> tuple[int, int]:
    """(longest, total) UTF-8 bytes of model.zeroshot.label_prompts(labels, templates), without building them.

    A template's every "{}" takes the label; a template without one gets " label" appended.
    """
    if not labels:
        return 0, 0
    label_bytes = [len(label.encode("utf-8")) for label in labels]
    n, summed, longest_label = len(labels), sum(label_bytes), max(label_bytes, default=0)
    longest = total = 0
    for template in templates:
        size, slots = len(template.encode("utf-8")), template.count("{}")
        if slots:
            longest = max(longest, size + slots * (longest_label - 2))
            total += n * size + slots * (summed - 2 * n)
        else:
            longest = max(longest, size + 1 + longest_label)
            total += n * (size + 1) + summed
    return longest, total


def check_prompt_sizes(labels: Sequence[str], templates: Sequence[str], *, per_prompt: int, total: int) -> None:
    """Bound the expanded prompts' text before anything is built or tokenized (their count alone is not enough)."""
    longest, summed = prompt_sizes(labels, templates)
    if longest > per_prompt:
        raise ApiError(422, "prompt_too_long", f"the longest label x template prompt is {longest:,} bytes of UTF-8; "
                       f"the limit is {per_prompt:,} (use shorter labels or templates)")
    if summed > total:
        raise ApiError(422, "prompts_too_large", f"{len(labels):,} labels x {len(templates):,} templates expand to "
                       f"{summed:,} bytes of UTF-8 prompts; the limit is {total:,}")


def check_k(k: int, settings: Settings) -> int:
    if k < 1 or k > settings.max_k:
        raise ApiError(422, "invalid_k", f"k must be between 1 and {settings.max_k}, got {k}")
    return k


async def read_image(decoder: ImageDecoder, upload: UploadFile) -> torch.Tensor:
    """Uploaded file -> preprocessed (3, S, S) tensor, decoded off the event loop within the decode budget."""
    data = await upload.read()
    if not data:
        raise ApiError(422, "empty_image", f"uploaded file {upload.filename or 'image'!r} is empty")
    return await decoder.preprocess(data)
