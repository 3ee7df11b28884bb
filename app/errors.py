"""Every error as {"error": {"code", "message"}}: the handlers and the OpenAPI documentation of them.

A catch-all handler logs unexpected exceptions (with the request id) and answers with the same
JSON shape, so a client never sees a bare traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from model.errors import ClipforgeError, ImageError, ImageTooLargeError

from .batching import QueueFull
from .forms import FormError
from .messages import public_message
from .route_table import route_table
from .schemas import ErrorResponse

log = logging.getLogger("clipforge.app")


class ApiError(Exception):
    """An error with an HTTP status and a stable code; raised anywhere in the app."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def not_ready(what: str) -> ApiError:
    return ApiError(503, "not_ready", what)


def error_json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": public_message(message)}}, status_code=status,
                        headers=headers)


def image_error(exc: ImageError) -> ApiError:
    """413 for pixel bombs, 415 for bytes that are no known image format, 422 for corrupt images."""
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, "image_too_large", str(exc))
    if isinstance(exc.__cause__, UnidentifiedImageError):
        return ApiError(415, "unsupported_image", f"{exc} (send a JPEG, PNG, WebP, GIF, BMP or TIFF)")
    return ApiError(422, "corrupt_image", str(exc))


HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 411: "length_required", 413: "payload_too_large",
    414: "uri_too_long", 415: "unsupported_media_type", 416: "range_not_satisfiable", 422: "validation_error",
    429: "too_many_requests", 500: "internal_error", 503: "not_ready",
}


def _describe_validation(exc: RequestValidationError) -> str:
    """Location and message of each problem, never the offending input (it may be megabytes or binary)."""
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({(err.get('ctx') or {}).get('error', 'decode error')})")
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_json(exc.status, exc.code, exc.message, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_json(422, "validation_error", _describe_validation(exc))


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in route_table(request.app.router).routes():
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    if status >= 500 and status != 503:
        log.error("http error %s: %s", status, exc.detail)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if status == 400 and message == "There was an error parsing the body":
        message = "the request body could not be parsed (malformed JSON or multipart, or invalid UTF-8)"
    code = exc.code if isinstance(exc, FormError) else HTTP_CODES.get(status, "error")
    return error_json(status, code, message, headers or None)


async def _overloaded(request: Request, exc: QueueFull) -> JSONResponse:
    retry_after = request.app.state.service.limits.retry_after_s
    return error_json(503, "overloaded", str(exc), headers={"Retry-After": str(retry_after)})


# seconds a client waits before retrying when the index store (a Milvus server) does not answer
INDEX_RETRY_AFTER_S = 5


async def _clipforge_error(request: Request, exc: ClipforgeError) -> JSONResponse:
    # index.errors.IndexUnavailableError (read by its flag: a service without an index never imports index/)
    if getattr(exc, "unavailable", False):  # the store is down, not the request wrong: every route alike
        return error_json(503, "index_unavailable", str(exc), headers={"Retry-After": str(INDEX_RETRY_AFTER_S)})
    if isinstance(exc, ImageError):
        err = image_error(exc)
        return error_json(err.status, err.code, err.message)
    return error_json(422, "invalid_request", str(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Runs outside the request-id middleware, so the id comes from the request scope."""
    request_id = str(request.scope.get("state", {}).get("request_id", "-"))
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc,
              extra={"request_id": request_id})
    return error_json(500, "internal_error",
                      f"an unexpected error occurred; it has been logged with request id {request_id}",
                      headers={"X-Request-ID": request_id})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClipforgeError, _clipforge_error)  # type: ignore[arg-type]
    app.add_exception_handler(QueueFull, _overloaded)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


_DESCRIPTIONS = {
    400: "Malformed request body",
    401: "Missing API key (send `Authorization: Bearer <key>`)",
    403: "Wrong API key, or writes disabled because no keys are configured",
    404: "No such image",
    413: "Request body, or the pixel count of an uploaded or stored image, over the limit",
    415: "Not an image format the service can decode",
    422: "Invalid parameters: bad k, too many or too long texts (or labels x templates), text that is not valid "
         "UTF-8, too many images, missing labels, corrupt image",
    503: "Model or index not loaded, or the server is overloaded (then with Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries, all with the one error schema."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


def image_upload_responses() -> dict[int | str, dict[str, Any]]:
    """The errors of a read endpoint that decodes one uploaded image (bad form, auth, size, type, input, readiness)."""
    return error_responses(400, 401, 403, 413, 415, 422, 503)
