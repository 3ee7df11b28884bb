"""POST /classify: zero-shot classification of an image against labels (arithmetic: model/zeroshot.py).

The image comes as a multipart upload, or as base64 in a JSON body (app/json_form.py); both are checked
and answered the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import torch
from fastapi import File, Form, UploadFile

from model import CLIPInference, rank_labels, templates_or_default

from ..dependencies import (
    ClipDep,
    DecoderDep,
    EncodersDep,
    ReadyStateDep,
    ServiceState,
    check_prompt_sizes,
    check_texts,
    read_image,
)
from ..encoders import Encoders
from ..errors import ApiError, image_upload_responses
from ..forms import json_alternative
from ..json_form import read_base64_image
from ..schemas import ClassifyJsonRequest, ClassifyResponse, Prediction
from . import read_router

router = read_router(tags=["classify"])


async def classify_json(
    state: ReadyStateDep, clip: ClipDep, decoder: DecoderDep, encoders: EncodersDep, body: ClassifyJsonRequest,
) -> ClassifyResponse:
    """The JSON form of POST /classify (the image as base64)."""
    return await _classify(state, clip, encoders, labels=body.labels, templates=body.templates, top_k=body.top_k,
                           pixels=lambda: read_base64_image(decoder, body.image,
                                                            max_bytes=state.settings.max_upload_bytes))


@router.post(
    "/classify", operation_id="classify", response_model=ClassifyResponse,
    responses=image_upload_responses(),
    summary="Zero-shot classify an image",
    description="Labels sorted by probability, at the model's own learned temperature (a prompt ensemble per "
                "label). Send multipart/form-data (repeat `labels` and `templates` once per item) or "
                "application/json with the image as base64 and the lists as JSON arrays.",
)
@json_alternative(classify_json)
async def classify(
    state: ReadyStateDep, clip: ClipDep, decoder: DecoderDep, encoders: EncodersDep,
    image: Annotated[UploadFile, File(description="the image to classify")],
    labels: Annotated[list[str], Form(description="candidate labels (repeat the field); default: the server's labels")] = [],  # noqa: B006 - FastAPI deep-copies defaults
    templates: Annotated[list[str], Form(description="prompt templates with {} for the label (repeat the field)")] = [],  # noqa: B006 - FastAPI deep-copies defaults
    top_k: Annotated[int | None, Form(ge=1, description="return only the k most probable labels")] = None,
) -> ClassifyResponse:
    """Labels sorted by probability, at the model's own learned temperature (a prompt ensemble per label)."""
    return await _classify(state, clip, encoders, labels=labels, templates=templates, top_k=top_k,
                           pixels=lambda: read_image(decoder, image))


async def _classify(state: ServiceState, clip: CLIPInference, encoders: Encoders, *, labels: list[str],
                    templates: list[str], top_k: int | None,
                    pixels: Callable[[], Awaitable[torch.Tensor]]) -> ClassifyResponse:
    """Check the texts (cheap) before the image is decoded (priced and gated), then rank."""
    settings = state.settings
    given_labels = bool(labels)
    if labels:
        labels = check_texts(labels, "labels", settings.max_labels, settings.max_text_chars)
    else:
        labels = state.default_labels
        if not labels:
            raise ApiError(422, "missing_labels", "no labels given and the server has no default labels "
                           "(the checkpoint stores no class names and no labels file was configured)")
    if templates:
        templates = check_texts(templates, "templates", settings.max_texts, settings.max_text_chars)
    expanded = templates_or_default(templates)
    prompts = len(labels) * len(expanded)
    # Only a request's own labels or templates are capped: the server's defaults alone are the
    # operator's choice (and their embeddings are cached after the first request).
    if given_labels or templates:
        if prompts > settings.prompt_limit:
            raise ApiError(422, "too_many_prompts", f"{len(labels):,} labels x {len(expanded):,} "
                           f"templates is {prompts:,} prompts; the limit is {settings.prompt_limit:,}")
        check_prompt_sizes(labels, expanded, per_prompt=state.limits.prompt_bytes(clip.tokenizer.max_length),
                           total=state.limits.max_prompt_bytes_total)
    image = await pixels()
    label_emb = await encoders.label_embeddings(labels, templates)
    image_emb = (await encoders.embed_pixels(image.unsqueeze(0)))[0]
    ranked = rank_labels(labels, clip.scores(image_emb, label_emb), top_k)
    return ClassifyResponse(predictions=[Prediction(label=l, similarity=s, probability=p) for l, s, p in ranked],
                            model=clip.model_id)
