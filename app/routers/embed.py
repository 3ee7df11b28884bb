"""POST /embed/text and /embed/image: L2-normalised embeddings for other programs."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Depends, File, UploadFile

from ..dependencies import ServiceState, check_texts, read_image, ready_state, require_read_key
from ..errors import ApiError, error_responses
from ..forms import StrictFormRoute
from ..schemas import EmbedImageResponse, EmbedTextRequest, EmbedTextResponse, ErrorBody, ImageEmbedding

router = APIRouter(route_class=StrictFormRoute, prefix="/embed", tags=["embed"], dependencies=[Depends(require_read_key)])


@router.post(
    "/text", operation_id="embed_text", response_model=EmbedTextResponse,
    responses=error_responses(400, 401, 403, 413, 422, 503),
    summary="Embed texts",
)
async def embed_text(state: Annotated[ServiceState, Depends(ready_state)], body: EmbedTextRequest) -> EmbedTextResponse:
    """One vector per text, in input order."""
    settings = state.settings
    texts = check_texts(body.texts, "texts", settings.max_texts, settings.max_text_chars)
    assert state.encoders is not None and state.clip is not None
    emb = await state.encoders.embed_texts(texts)
    return EmbedTextResponse(embeddings=emb.tolist(), dim=state.clip.dim, model=state.clip.model_id)


@router.post(
    "/image", operation_id="embed_image", response_model=EmbedImageResponse,
    responses=error_responses(400, 401, 403, 413, 422, 503),
    summary="Embed images",
)
async def embed_image(
    state: Annotated[ServiceState, Depends(ready_state)],
    images: Annotated[list[UploadFile], File(description="one or more images (repeat the field)")],
) -> EmbedImageResponse:
    """One entry per image, in upload order; an image that cannot be decoded gets an error, the others still embed."""
    settings = state.settings
    if not images:
        raise ApiError(422, "missing_images", "at least one image is required")
    if len(images) > settings.max_images:
        raise ApiError(422, "too_many_images", f"{len(images)} images given; the limit is {settings.max_images}")
    assert state.encoders is not None and state.clip is not None
    results: list[ImageEmbedding] = []
    good: list[tuple[int, torch.Tensor]] = []
    for i, upload in enumerate(images):
        name = upload.filename or f"image{i}"
        try:
            good.append((i, await read_image(state, upload)))
            results.append(ImageEmbedding(filename=name))
        except ApiError as err:
            results.append(ImageEmbedding(filename=name, error=ErrorBody(code=err.code, message=err.message)))
    if good:
        emb = await state.encoders.embed_pixels(torch.stack([t for _, t in good]))
        for (i, _), vec in zip(good, emb):
            results[i].embedding = vec.tolist()
    return EmbedImageResponse(results=results, dim=state.clip.dim, model=state.clip.model_id)
