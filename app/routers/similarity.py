"""POST /similarity: how well each of several texts describes one image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from ..dependencies import ServiceState, check_texts, read_image, ready_state, require_read_key
from ..errors import error_responses
from ..forms import StrictFormRoute
from ..schemas import SimilarityResponse, TextScore

router = APIRouter(route_class=StrictFormRoute, tags=["similarity"], dependencies=[Depends(require_read_key)])


@router.post(
    "/similarity", operation_id="similarity", response_model=SimilarityResponse,
    responses=error_responses(400, 401, 403, 413, 415, 422, 503),
    summary="Score texts against an image",
)
async def similarity(
    state: Annotated[ServiceState, Depends(ready_state)],
    image: Annotated[UploadFile, File(description="the image")],
    texts: Annotated[list[str], Form(description="texts to score (repeat the field)")],
) -> SimilarityResponse:
    """Per text, in input order: cosine similarity and the softmax probability over the given texts."""
    settings = state.settings
    texts = check_texts(texts, "texts", settings.max_texts, settings.max_text_chars)
    pixels = await read_image(state, image)
    assert state.encoders is not None and state.clip is not None
    text_emb = await state.encoders.embed_texts(texts)
    image_emb = (await state.encoders.embed_pixels(pixels.unsqueeze(0)))[0]
    pairs = state.clip.scores(image_emb, text_emb)
    return SimilarityResponse(
        results=[TextScore(text=t, similarity=s, probability=p) for t, (s, p) in zip(texts, pairs)],
        model=state.clip.model_id,
    )
