"""POST /similarity: how well each of several texts describes one image (multipart, or JSON with base64)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import torch
from fastapi import File, Form, UploadFile

from model import CLIPInference

from ..dependencies import (
    ClipDep,
    DecoderDep,
    EncodersDep,
    SettingsDep,
    check_texts,
    read_image,
)
from ..encoders import Encoders
from ..errors import image_upload_responses
from ..forms import json_alternative
from ..json_form import read_base64_image
from ..schemas import SimilarityJsonRequest, SimilarityResponse, TextScore
from ..settings import Settings
from . import read_router

router = read_router(tags=["similarity"])


async def similarity_json(
    settings: SettingsDep, clip: ClipDep, decoder: DecoderDep, encoders: EncodersDep, body: SimilarityJsonRequest,
) -> SimilarityResponse:
    """The JSON form of POST /similarity (the image as base64)."""
    return await _similarity(settings, clip, encoders, texts=body.texts,
                             pixels=lambda: read_base64_image(decoder, body.image, max_bytes=settings.max_upload_bytes))


@router.post(
    "/similarity", operation_id="similarity", response_model=SimilarityResponse,
    responses=image_upload_responses(),
    summary="Score texts against an image",
    description="Per text, in input order: cosine similarity and the softmax probability over the given texts. "
                "Send multipart/form-data (repeat `texts` once per text) or application/json with the image as "
                "base64 and `texts` as a JSON array.",
)
@json_alternative(similarity_json)
async def similarity(
    settings: SettingsDep, clip: ClipDep, decoder: DecoderDep, encoders: EncodersDep,
    image: Annotated[UploadFile, File(description="the image")],
    texts: Annotated[list[str], Form(description="texts to score (repeat the field)")],
) -> SimilarityResponse:
    """Per text, in input order: cosine similarity and the softmax probability over the given texts."""
    return await _similarity(settings, clip, encoders, texts=texts, pixels=lambda: read_image(decoder, image))


async def _similarity(settings: Settings, clip: CLIPInference, encoders: Encoders, *, texts: list[str],
                      pixels: Callable[[], Awaitable[torch.Tensor]]) -> SimilarityResponse:
    texts = check_texts(texts, "texts", settings.max_texts, settings.max_text_chars)
    image = await pixels()
    text_emb = await encoders.embed_texts(texts)
    image_emb = (await encoders.embed_pixels(image.unsqueeze(0)))[0]
    pairs = clip.scores(image_emb, text_emb)
    return SimilarityResponse(
        results=[TextScore(text=t, similarity=s, probability=p) for t, (s, p) in zip(texts, pairs)],
        model=clip.model_id,
    )
