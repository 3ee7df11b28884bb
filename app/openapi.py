"""The OpenAPI schema as clients see it: tags, this server's configured limits, uploads typed as files.

Edits are keyed on the operation ids the routers set (`classify`, `search_by_image`, ...) and on
parameter and field names, never on the names FastAPI generates for form bodies.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .settings import Settings

TAGS = [
    {"name": "classify", "description": "Zero-shot classification"},
    {"name": "search", "description": "Text-to-image and image-to-image retrieval over the index"},
    {"name": "similarity", "description": "Image-text similarity"},
    {"name": "embed", "description": "Embeddings for other programs"},
    {"name": "images", "description": "The indexed images: fetch, add (API key), delete (API key)"},
    {"name": "system", "description": "Model card, health, readiness and metrics"},
]
DESCRIPTION = ("CLIP embeddings, similarity, zero-shot classification and text-to-image search. "
               "Every error is `{\"error\": {\"code\", \"message\"}}`.")

# (operation id, request body field, setting with its most items): lists of texts
_TEXT_LISTS = (("classify", "labels", "max_labels"), ("similarity", "texts", "max_texts"),
               ("embed_text", "texts", "max_texts"))
# (operation id, request body field): result counts bounded by max_k
_K_FIELDS = (("search_by_image", "k"),)


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for item in schema.get("paths", {}).values() for op in item.values() if isinstance(op, dict)]


def _body_properties(schema: dict[str, Any], operation_id: str) -> dict[str, Any]:
    """The properties of an operation's request body, followed through its $ref into components."""
    components = schema.get("components", {}).get("schemas", {})
    for op in _operations(schema):
        if op.get("operationId") != operation_id:
            continue
        for media in op.get("requestBody", {}).get("content", {}).values():
            body = media.get("schema", {})
            ref = body.get("$ref", "")
            if ref.startswith("#/components/schemas/"):
                body = components.get(ref.rsplit("/", 1)[1], {})
            return body.get("properties", {})
    return {}


def document_limits(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write this server's configured limits into the schema, so clients and fuzzers see the real bounds."""
    for op in _operations(schema):
        for param in op.get("parameters", []):
            if param.get("name") == "k":
                param["schema"].update(minimum=1, maximum=settings.max_k)
            elif param.get("name") == "q":
                param["schema"].update(minLength=1, maxLength=settings.max_text_chars)
    for operation_id, name, limit in _TEXT_LISTS:
        prop = _body_properties(schema, operation_id).get(name)
        if prop is not None:
            prop["maxItems"] = getattr(settings, limit)
            prop.setdefault("items", {}).update(minLength=1, maxLength=settings.max_text_chars)
    for operation_id, name in _K_FIELDS:
        prop = _body_properties(schema, operation_id).get(name)
        if prop is not None:
            prop.update(minimum=1, maximum=settings.max_k)
    return schema


def mark_uploads_binary(schema: dict[str, Any]) -> dict[str, Any]:
    """File fields as `format: binary` too (OpenAPI 3.0 style), so generated clients type them as files."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("contentMediaType") == "application/octet-stream" and node.get("type") == "string":
                node["format"] = "binary"
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema.get("components", {}))
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """app.openapi() builds FastAPI's schema once, then shapes it for these settings."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_limits(mark_uploads_binary(default_openapi()), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
