"""Request and response models: the typed contract that the OpenAPI schema and generated clients see."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.config import Precision

from .messages import public_message


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. image_too_large")
    message: str = Field(description="what is wrong and, where possible, how to fix it")

    @field_validator("message")
    @classmethod
    def _no_object_reprs(cls, value: str) -> str:
        return public_message(value)


class ErrorResponse(BaseModel):
    """The one shape of every error the service returns."""

    error: ErrorBody


# ---------------------------------------------------------------------- classify / similarity
# Padded standard base64 as the schema states it; the server also takes a data: URL prefix and line breaks
# (app/json_form.py decodes it, so the pattern is only documented, not enforced by pydantic).
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class ClassifyJsonRequest(BaseModel):
    """POST /classify as JSON, for callers that cannot send multipart: the image as base64."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="the image file's bytes, base64 (standard alphabet, padded)",
                       json_schema_extra={"contentEncoding": "base64", "pattern": BASE64_PATTERN})
    labels: list[str] = Field(default_factory=list, description="candidate labels; default: the server's labels")
    templates: list[str] = Field(default_factory=list, description="prompt templates with {} for the label")
    top_k: int | None = Field(None, ge=1, description="return only the k most probable labels")


class SimilarityJsonRequest(BaseModel):
    """POST /similarity as JSON, for callers that cannot send multipart: the image as base64."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="the image file's bytes, base64 (standard alphabet, padded)",
                       json_schema_extra={"contentEncoding": "base64", "pattern": BASE64_PATTERN})
    texts: list[str] = Field(min_length=1, description="texts to score")


class Prediction(BaseModel):
    label: str
    probability: float = Field(description="softmax over the labels at the model's learned temperature")
    similarity: float = Field(description="cosine similarity of image and label embeddings")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction] = Field(description="sorted by probability, highest first")
    model: str = Field(description="checkpoint content hash")


class TextScore(BaseModel):
    text: str
    similarity: float
    probability: float


class SimilarityResponse(BaseModel):
    results: list[TextScore] = Field(description="one entry per input text, in input order")
    model: str


# ---------------------------------------------------------------------- embed
class EmbedTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, description="strings to embed")


class EmbedTextResponse(BaseModel):
    embeddings: list[list[float]] = Field(description="L2-normalised vectors, one per input text")
    dim: int
    model: str


class ImageEmbedding(BaseModel):
    filename: str
    embedding: list[float] | None = Field(None, description="L2-normalised vector; null when the image failed")
    error: ErrorBody | None = Field(None, description="why this image could not be embedded")


class EmbedImageResponse(BaseModel):
    results: list[ImageEmbedding] = Field(description="one entry per uploaded image, in upload order")
    dim: int
    model: str


# ---------------------------------------------------------------------- search
class SearchHit(BaseModel):
    id: int
    score: float
    path: str = Field(description="path relative to the index root")
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    url: str = Field(description="where GET /images/{id} serves the image")


class SearchResponse(BaseModel):
    query: str = Field(description="the text query, or the uploaded file name for image queries")
    results: list[SearchHit]
    model: str


# ---------------------------------------------------------------------- images
class AddedImage(BaseModel):
    id: int
    filename: str


class FailedImage(BaseModel):
    filename: str
    error: ErrorBody


class AddImagesResponse(BaseModel):
    added: list[AddedImage]
    duplicates: list[AddedImage] = Field(description="already in the index (same content); the existing id")
    failed: list[FailedImage]
    size: int = Field(description="images in the index after the write")


class DeleteImageResponse(BaseModel):
    deleted: int
    size: int


# ---------------------------------------------------------------------- system
class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model: bool
    index: bool


class IndexInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    size: int
    type: str | None = None


class InfoResponse(BaseModel):
    preset: str = Field(description="the named preset the config matches, or 'custom'")
    model: str = Field(description="checkpoint content hash")
    dim: int
    config: dict[str, Any]
    metrics: dict[str, Any] = Field(description="evaluation results stored in the checkpoint")
    params: dict[str, Any] = Field(default_factory=dict)
    step: int | None = None
    created: str | None = None
    origin: dict[str, Any] = Field(
        default_factory=dict,
        description="where the model came from: 'source' for an import (format, name_or_path, arch, license as the "
        "source states it), 'fine_tuned_from' (checkpoint, content_hash), 'pretrained_towers' (image/text "
        "hf:DIR); empty for a model clipforge trained from scratch")
    logit_scale: float
    runtime: str = Field("torch", description="what runs the forward passes: torch, or onnxruntime when the service "
                                              "serves the checkpoint's ONNX export (CLIPFORGE_ONNX)")
    precision: Precision = Field("fp32", description="fp32 or bf16: the dtype of the torch forward passes (CLIPFORGE_PRECISION)")
    default_labels: list[str]
    index: IndexInfo | None = Field(None, description="null when the service runs without an index")
    batching: dict[str, Any]
    limits: dict[str, int]
