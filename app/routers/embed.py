"""POST /embed/text and /embed/image: L2-normalised embeddings for other programs."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import File, UploadFile

from ..dependencies import (
    ClipDep,
    DecoderDep,
    EncodersDep,
    SettingsDep,
    check_texts,
    read_image,
)
from ..errors import ApiError, error_responses
from ..schemas import (
    EmbedImageResponse,
    EmbedTextRequest,
    EmbedTextResponse,
    ErrorBody,
    ImageEmbedding,
)
from . import read_router

router = read_router(tags=["embed"], prefix="/embed")


@router.post(
    "/text", operation_id="embed_text", response_model=EmbedTextResponse,
    responses=error_responses(400, 401, 403, 413, 422, 503),
    summary="Embed texts",
)
async def embed_text(
    settings: SettingsDep, clip: ClipDep, encoders: EncodersDep, body: EmbedTextRequest
) -> EmbedTextResponse:
    """One vector per text, in input order."""
    texts = check_texts(body.texts, "texts", settings.max_texts, settings.max_text_chars)
    emb = await encoders.embed_texts(texts)
    return EmbedTextResponse(embeddings=emb.tolist(), dim=clip.dim, model=clip.model_id)


@router.post(
    "/image", operation_id="embed_image", response_model=EmbedImageResponse,
    responses=error_responses(400, 401, 403, 413, 422, 503),
    summary="Embed images",
)
async def embed_image(
    settings: SettingsDep, clip: ClipDep, decoder: DecoderDep, encoders: EncodersDep,
    images: Annotated[list[UploadFile], File(description="one or more images (repeat the field)")],
) -> EmbedImageResponse:
    """One entry per image, in upload order; an image that cannot be decoded gets an error, the others still embed."""
    if not images:
        raise ApiError(422, "missing_images", "at least one image is required")
    if len(images) > settings.max_images:
        raise ApiError(422, "too_many_images", f"{len(images)} images given; the limit is {settings.max_images}")
    results: list[ImageEmbedding] = []
    good: list[tuple[int, torch.Tensor]] = []
    for i, upload in enumerate(images):
        name = upload.filename or f"image{i}"
        try:
            good.append((i, await read_image(decoder, upload)))
            results.append(ImageEmbedding(filename=name))
        except ApiError as err:
            results.append(ImageEmbedding(filename=name, error=ErrorBody(code=err.code, message=err.message)))
    if good:
        emb = await encoders.embed_pixels(torch.stack([t for _, t in good]))
        for (i, _), vec in zip(good, emb):
            results[i].embedding = vec.tolist()
    return EmbedImageResponse(results=results, dim=clip.dim, model=clip.model_id)
