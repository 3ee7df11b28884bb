"""GET /search (text to image) and POST /search/image (image to image) over the index."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated
from urllib.parse import unquote_to_bytes

from fastapi import File, Form, Query, Request, UploadFile

from ..dependencies import (
    ClipDep,
    DecoderDep,
    EncodersDep,
    SearcherDep,
    SettingsDep,
    check_k,
    check_text,
    read_image,
)
from ..errors import ApiError, error_responses, image_upload_responses
from ..schemas import SearchHit, SearchResponse
from ..search_filters import FormFilterDep, QueryFilterDep
from . import read_router

if TYPE_CHECKING:
    from index import SearchResult

router = read_router(tags=["search"], prefix="/search")


def _response(request: Request, query: str, found: list[SearchResult], model_id: str) -> SearchResponse:
    """Results with the URL of GET /images/{id} (behind a proxy prefix too, via root_path)."""
    prefix = request.scope.get("root_path", "").rstrip("/")
    hits = [
        SearchHit(
            id=hit.id, score=float(hit.score), path=str(hit.path), caption=hit.caption,
            width=hit.width, height=hit.height, url=f"{prefix}/images/{hit.id}",
        )
        for hit in found
    ]
    return SearchResponse(query=query, results=hits, model=model_id)


def _raw_query_is_utf8(request: Request) -> None:
    """Percent-encoded bytes that are not UTF-8 would otherwise arrive silently replaced by U+FFFD."""
    try:
        unquote_to_bytes(request.scope.get("query_string", b"").decode("latin-1").replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_text", "the query string is not valid UTF-8") from None


@router.get(
    "", operation_id="search", response_model=SearchResponse,
    responses=error_responses(401, 403, 422, 503), summary="Search images by text",
)
async def search(
    request: Request, settings: SettingsDep, clip: ClipDep, encoders: EncodersDep, searcher: SearcherDep,
    q: Annotated[str, Query(description="what to look for, e.g. 'a red envelope'")],
    k: Annotated[int, Query(description="how many results (1 to the server's max_k)")] = 10,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0, description="drop results below this cosine similarity")] = None,
    conditions: QueryFilterDep = None,
) -> SearchResponse:
    """The k indexed images most similar to the text, best first; with filters, the k best among those that pass."""
    _raw_query_is_utf8(request)
    check_k(k, settings)
    check_text(q, "q", settings.max_text_chars)
    vector = (await encoders.embed_texts([q]))[0]
    return _response(request, q, await searcher.search(vector, k, min_score, conditions), clip.model_id)


@router.post(
    "/image", operation_id="search_by_image", response_model=SearchResponse,
    responses=image_upload_responses(), summary="Search images by image",
)
async def search_by_image(
    request: Request, settings: SettingsDep, clip: ClipDep, decoder: DecoderDep, encoders: EncodersDep,
    searcher: SearcherDep,
    image: Annotated[UploadFile, File(description="find indexed images like this one")],
    k: Annotated[int, Form(description="how many results (1 to the server's max_k)")] = 10,
    min_score: Annotated[float | None, Form(ge=-1.0, le=1.0, description="drop results below this cosine similarity")] = None,
    conditions: FormFilterDep = None,
) -> SearchResponse:
    """The k indexed images most similar to the uploaded one, best first; with filters, the k best among those that pass."""
    check_k(k, settings)
    pixels = await read_image(decoder, image)
    vector = (await encoders.embed_pixels(pixels.unsqueeze(0)))[0]
    return _response(request, image.filename or "image", await searcher.search(vector, k, min_score, conditions), clip.model_id)
