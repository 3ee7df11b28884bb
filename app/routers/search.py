"""GET /search (text to image) and POST /search/image (image to image) over the index."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile

from ..dependencies import ServiceState, check_k, check_text, indexed_state, read_image, require_read_key
from ..errors import ApiError, error_responses
from ..forms import StrictFormRoute
from ..schemas import SearchHit, SearchResponse

router = APIRouter(route_class=StrictFormRoute, prefix="/search", tags=["search"], dependencies=[Depends(require_read_key)])


def _hits(request: Request, found: list[Any]) -> list[SearchHit]:
    """Results with the URL of GET /images/{id} (behind a proxy prefix too, via root_path)."""
    prefix = request.scope.get("root_path", "").rstrip("/")
    return [
        SearchHit(
            id=hit.id, score=float(hit.score), path=str(hit.path), caption=hit.caption,
            width=hit.width, height=hit.height, url=f"{prefix}/images/{hit.id}",
        )
        for hit in found
    ]


def _raw_query_is_utf8(request: Request) -> None:
    """Percent-encoded bytes that are not UTF-8 would otherwise arrive silently replaced by U+FFFD."""
    try:
        unquote_to_bytes(request.scope.get("query_string", b"").decode("latin-1").replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_text", "the query string is not valid UTF-8") from None


async def _search(state: ServiceState, vector: np.ndarray, k: int, min_score: float | None) -> list[Any]:
    assert state.searcher is not None
    return await state.searcher.submit((vector, k, min_score))


@router.get(
    "", operation_id="search", response_model=SearchResponse,
    responses=error_responses(401, 403, 422, 503), summary="Search images by text",
)
async def search(
    request: Request,
    state: Annotated[ServiceState, Depends(indexed_state)],
    q: Annotated[str, Query(description="what to look for, e.g. 'a red envelope'")],
    k: Annotated[int, Query(description="how many results (1 to the server's max_k)")] = 10,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0, description="drop results below this cosine similarity")] = None,
) -> SearchResponse:
    """The k indexed images most similar to the text, best first."""
    _raw_query_is_utf8(request)
    check_k(k, state.settings)
    check_text(q, "q", state.settings.max_text_chars)
    assert state.encoders is not None and state.clip is not None
    vector = (await state.encoders.embed_texts([q]))[0]
    found = await _search(state, vector, k, min_score)
    return SearchResponse(query=q, results=_hits(request, found), model=state.clip.model_id)


@router.post(
    "/image", operation_id="search_by_image", response_model=SearchResponse,
    responses=error_responses(400, 401, 403, 413, 415, 422, 503), summary="Search images by image",
)
async def search_by_image(
    request: Request,
    state: Annotated[ServiceState, Depends(indexed_state)],
    image: Annotated[UploadFile, File(description="find indexed images like this one")],
    k: Annotated[int, Form(description="how many results (1 to the server's max_k)")] = 10,
    min_score: Annotated[float | None, Form(ge=-1.0, le=1.0, description="drop results below this cosine similarity")] = None,
) -> SearchResponse:
    """The k indexed images most similar to the uploaded one, best first."""
    check_k(k, state.settings)
    pixels = await read_image(state, image)
    assert state.encoders is not None and state.clip is not None
    vector = (await state.encoders.embed_pixels(pixels.unsqueeze(0)))[0]
    found = await _search(state, vector, k, min_score)
    return SearchResponse(query=image.filename or "image", results=_hits(request, found), model=state.clip.model_id)
