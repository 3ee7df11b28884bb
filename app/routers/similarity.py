"""POST /similarity: how well each of several texts describes one image."""

from __future__ import annotations

from typing import Annotated

from fastapi import File, Form, UploadFile

from ..dependencies import ClipDep, DecoderDep, EncodersDep, SettingsDep, check_texts, read_image
from ..errors import image_upload_responses
from ..schemas import SimilarityResponse, TextScore
from . import read_router

router = read_router(tags=["similarity"])


@router.post(
    "/similarity", operation_id="similarity", response_model=SimilarityResponse,
    responses=image_upload_responses(),
    summary="Score texts against an image",
)
async def similarity(
    settings: SettingsDep, clip: ClipDep, decoder: DecoderDep, encoders: EncodersDep,
    image: Annotated[UploadFile, File(description="the image")],
    texts: Annotated[list[str], Form(description="texts to score (repeat the field)")],
) -> SimilarityResponse:
    """Per text, in input order: cosine similarity and the softmax probability over the given texts."""
    texts = check_texts(texts, "texts", settings.max_texts, settings.max_text_chars)
    pixels = await read_image(decoder, image)
    text_emb = await encoders.embed_texts(texts)
    image_emb = (await encoders.embed_pixels(pixels.unsqueeze(0)))[0]
    pairs = clip.scores(image_emb, text_emb)
    return SimilarityResponse(
        results=[TextScore(text=t, similarity=s, probability=p) for t, (s, p) in zip(texts, pairs)],
        model=clip.model_id,
    )
