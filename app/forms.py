"""Strict multipart forms: text fields must decode in the declared charset, and too many parts is a 422.

Starlette's form parser decodes a text field that is not valid UTF-8 as latin-1 instead, so garbled
labels ("cafÃ(") would be classified with a 200; the decoded string alone cannot tell a fallback from
a genuine "Ã", so the check has to see the raw bytes, which only the parser has. It also refuses too
many fields or files with a bare 400 before a route can apply its own limits. `StrictFormRoute` (the
route class of every router with form bodies) gives each request a parser that decodes strictly and
counts parts itself, answering both with the app's 422 codes.

Callers that cannot send multipart may send the same request as JSON (the image as base64): a route
whose endpoint is marked `@json_alternative(endpoint)` hands application/json bodies to that endpoint
(validated by FastAPI as usual); app/json_form.py turns its base64 image into the upload's bytes.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import aclosing
from functools import cached_property
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette._utils import AwaitableOrContextManager, AwaitableOrContextManagerWrapper
from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import (
    MultiPartException,
    MultiPartParser,
    parse_options_header,
)

# The form fields the routes read as text; other fields are left to the routes (ignored or validated there).
TEXT_FIELDS = frozenset({"labels", "templates", "texts", "captions"})


class FormError(HTTPException):
    """A 422 with the app's own error code, raised while the body is read (FastAPI passes HTTPExceptions on)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(422, message)
        self.code = code


class StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, but a text field that does not decode is refused, and parts are counted here."""

    def __init__(self, headers: Headers, stream: AsyncGenerator[bytes, None], *, max_files: float,
                 max_fields: float, max_part_size: int) -> None:
        super().__init__(headers, stream, max_files=math.inf, max_fields=math.inf, max_part_size=max_part_size)
        self.file_limit, self.field_limit = max_files, max_fields
        self.files = self.fields = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._current_part.file is not None:
            self.files += 1
            if self.files > self.file_limit:
                raise FormError("too_many_images", f"more than {int(self.file_limit):,} files in one request")
        else:
            self.fields += 1
            if self.fields > self.field_limit:
                raise FormError("too_many_texts", f"more than {int(self.field_limit):,} form fields in one "
                                "request (see the limits on labels and texts in GET /info)")

    @cached_property
    def _text_charset(self) -> str:
        """The charset text fields are checked against, resolved once per request: the request's (Starlette
        already maps unknown names to latin-1), or UTF-8 where it names a codec that is not a text encoding."""
        try:
            b"a".decode(self._charset)  # (an empty probe would pass: b"".decode() short-circuits)
        except LookupError:  # e.g. charset=base64
            return "utf-8"
        except UnicodeDecodeError:  # a text encoding that needs more bytes (utf-16, utf-32)
            pass
        return self._charset

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None and part.field_name in TEXT_FIELDS:
            try:
                bytes(part.data).decode(self._text_charset)
            except UnicodeDecodeError:
                message = f"form field {part.field_name!r} is not valid {self._text_charset.upper()}"
                raise FormError("invalid_text", message) from None
        super().on_part_end()


class StrictFormRequest(Request):
    """A request whose multipart body goes through `StrictMultiPartParser`; other bodies as Starlette reads them."""

    def form(self, *, max_files: float = 1000, max_fields: float = 1000,
             max_part_size: int = 1024 * 1024) -> AwaitableOrContextManager[FormData]:
        return AwaitableOrContextManagerWrapper(self._strict_form(max_files, max_fields, max_part_size))

    async def _strict_form(self, max_files: float, max_fields: float, max_part_size: int) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = StrictMultiPartParser(self.headers, stream, max_files=max_files, max_fields=max_fields,
                                                   max_part_size=max_part_size)
                    self._form = await parser.parse()
            except MultiPartException as exc:
                raise HTTPException(400, exc.message) from None
        return await super().form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)


Endpoint = Callable[..., Coroutine[Any, Any, Any]]
_JSON_ENDPOINT = "__json_alternative__"


def json_alternative(json_endpoint: Endpoint) -> Callable[[Endpoint], Endpoint]:
    """Mark a multipart endpoint: application/json bodies of its route go to `json_endpoint` instead."""

    def mark(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _JSON_ENDPOINT, json_endpoint)
        return endpoint

    return mark


def _is_json(request: Request) -> bool:
    content_type, _ = parse_options_header(request.headers.get("Content-Type"))
    return content_type == b"application/json" or content_type.endswith(b"+json")


class StrictFormRoute(APIRoute):
    """Route class (the documented FastAPI hook for a custom Request) that reads forms strictly.

    Where the endpoint has a JSON alternative, a JSON body is answered by a hidden route to it with the
    same path, dependencies (API key) and response model, so both forms are validated the same way.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        json_endpoint = getattr(self.endpoint, _JSON_ENDPOINT, None)
        json_handler = None if json_endpoint is None else APIRoute(
            self.path, json_endpoint, methods=list(self.methods or ["POST"]), response_model=self.response_model,
            dependencies=list(self.dependencies), responses=self.responses, include_in_schema=False,
            operation_id=f"{self.operation_id}_json" if self.operation_id else None,
            dependency_overrides_provider=self.dependency_overrides_provider,
        ).get_route_handler()

        async def strict(request: Request) -> Response:
            if json_handler is not None and _is_json(request):
                return await json_handler(request)
            return await handler(StrictFormRequest(request.scope, request.receive))

        return strict
