"""The OpenAPI schema as clients see it: tags, this server's configured limits, uploads typed as files,
an API key declared exactly where this server asks for one, and bodies every common generator sends right.

Edits are keyed on the operation ids the routers set (`classify`, `search_by_image`, ...) and on
parameter and field names, never on the names FastAPI generates for form bodies. The schema is built
per settings: with open reads (the default) only writes declare the bearer key.

Generators (openapi-generator's python and typescript-fetch among them) join a multipart array into one
comma-separated field unless the body's `encoding` says `style: form, explode: true`, so every text list
of a multipart body declares it: they then repeat the field, which is what the server reads.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel

from .dependencies import require_read_key, require_write_key
from .route_table import reachable_routes
from .schemas import ClassifyJsonRequest, SimilarityJsonRequest
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
# (operation id, request body field): arrays of uploaded images, 1 to max_images
_IMAGE_LISTS = (("embed_image", "images"), ("add_images", "images"))
# (operation id, request body field): arrays that must not be empty
_NON_EMPTY = (("similarity", "texts"),)
# operation id -> the model of its JSON form (the multipart route hands JSON bodies on: app/forms.py)
JSON_FORMS: dict[str, type[BaseModel]] = {"classify": ClassifyJsonRequest, "similarity": SimilarityJsonRequest}
# What dependencies.check_text takes: something besides whitespace, and no NUL
TEXT_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"
_METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for item in schema.get("paths", {}).values() for method, op in item.items()
            if method in _METHODS and isinstance(op, dict)]


def _operation(schema: dict[str, Any], operation_id: str) -> dict[str, Any] | None:
    return next((op for op in _operations(schema) if op.get("operationId") == operation_id), None)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        return schema.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
    return node


def _bodies_properties(schema: dict[str, Any], operation_id: str) -> list[dict[str, Any]]:
    """The properties of each of an operation's request body forms, followed through $ref into components."""
    op = _operation(schema, operation_id) or {}
    return [_resolve(schema, media.get("schema", {})).get("properties", {})
            for media in op.get("requestBody", {}).get("content", {}).values()]


def _fields(schema: dict[str, Any], operation_id: str, name: str) -> list[dict[str, Any]]:
    return [props[name] for props in _bodies_properties(schema, operation_id) if name in props]


def _integer_branches(param_schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The integer schema of a parameter, also inside an optional one's anyOf [integer, null]."""
    return [s for s in [param_schema, *param_schema.get("anyOf", [])] if s.get("type") == "integer"]


def document_limits(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write this server's configured limits into the schema, so clients and fuzzers see the real bounds."""
    for op in _operations(schema):
        for param in op.get("parameters", []):
            if param.get("name") == "k":
                param["schema"].update(minimum=1, maximum=settings.max_k)
            elif param.get("name") == "q":
                param["schema"].update(minLength=1, maxLength=settings.max_text_chars)
            elif param.get("name") == "size" and op.get("operationId") == "get_image":
                for branch in _integer_branches(param["schema"]):
                    branch["maximum"] = settings.max_thumbnail
    for operation_id, name, limit in _TEXT_LISTS:
        for prop in _fields(schema, operation_id, name):
            prop["maxItems"] = getattr(settings, limit)
            prop.setdefault("items", {}).update(minLength=1, maxLength=settings.max_text_chars, pattern=TEXT_PATTERN)
    for operation_id, name in _K_FIELDS:
        for prop in _fields(schema, operation_id, name):
            prop.update(minimum=1, maximum=settings.max_k)
    for operation_id, name in _IMAGE_LISTS:
        for prop in _fields(schema, operation_id, name):
            prop.update(minItems=1, maxItems=settings.max_images)
    for operation_id, name in _NON_EMPTY:
        for prop in _fields(schema, operation_id, name):
            prop["minItems"] = 1
    return schema


def add_json_forms(schema: dict[str, Any]) -> dict[str, Any]:
    """Each operation with a JSON form lists it first, then multipart.

    openapi-generator builds a client for the first form only, but its python client picks a JSON content
    type whenever one is listed: with multipart first it sends the form's fields under a JSON header. JSON
    first, its clients (python, typescript-fetch) send the JSON form, lists as JSON arrays; clients that
    take every form (openapi-python-client) can send either.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for operation_id, model in JSON_FORMS.items():
        op = _operation(schema, operation_id)
        if op is None or "requestBody" not in op:
            continue
        components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        json_form = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
        op["requestBody"]["content"] = {"application/json": json_form, **op["requestBody"]["content"]}
    return schema


def shape_multipart_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """Multipart bodies as a form can carry them: text lists repeat the field, optional fields have no null.

    A form has no null (a field is sent or left out), so `anyOf [X, null]` becomes X there.
    """
    for op in _operations(schema):
        media = op.get("requestBody", {}).get("content", {}).get("multipart/form-data")
        if media is None:
            continue
        for name, prop in _resolve(schema, media.get("schema", {})).get("properties", {}).items():
            branches = prop.get("anyOf", [])
            kept = [b for b in branches if b.get("type") != "null"]
            if branches and len(kept) == 1 and len(branches) == 2:
                del prop["anyOf"]
                prop.update(kept[0])
            items = prop.get("items", {})
            if prop.get("type") == "array" and items.get("type") == "string" and "format" not in items:
                media.setdefault("encoding", {})[name] = {"style": "form", "explode": True}
    return schema


def _calls(dependant: Dependant) -> set[Any]:
    found: set[Any] = set()
    for sub in dependant.dependencies:
        found.add(sub.call)
        found |= _calls(sub)
    return found


def declare_security(schema: dict[str, Any], app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The bearer key only where this server asks for it: writes always, reads only with protect_reads."""
    for route in reachable_routes(app.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        calls = _calls(route.dependant)
        needs_key = require_write_key in calls or (settings.protect_reads and require_read_key in calls)
        item = schema.get("paths", {}).get(route.path_format, {})
        for method in route.methods:
            op = item.get(method.lower())
            if isinstance(op, dict) and not needs_key:
                op.pop("security", None)
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
            schema = add_json_forms(mark_uploads_binary(default_openapi()))
            schema = declare_security(shape_multipart_bodies(schema), app, settings)
            app.openapi_schema = document_limits(schema, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
