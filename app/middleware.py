"""ASGI middleware: request ids, access logs and metrics; the API key before the body; the body's size
and time limits; every error in the JSON shape.

All are plain ASGI (no BaseHTTPMiddleware), so streaming bodies and background tasks behave.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .dependencies import (
    bearer_credentials,
    check_key,
    require_read_key,
    require_write_key,
)
from .errors import HTTP_CODES, ApiError
from .logs import request_id_var
from .messages import public_message
from .metrics import ServiceMetrics
from .route_table import route_table
from .settings import Settings

log = logging.getLogger("clipforge.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _route_of(scope: Scope) -> str:
    """The route template (/images/{id}), never the raw path, so metric labels stay few."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContextMiddleware:
    """Gives each request an id (the client's X-Request-ID if sane), echoes it, logs and counts the request."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.in_flight.inc()
        self.metrics.active += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.active -= 1
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route, method = _route_of(scope), scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            log.info(
                "%s %s %s", method, route, status,
                extra={"method": method, "route": route, "status": status, "duration_ms": round(elapsed * 1000, 2),
                       "client": (scope.get("client") or ("-",))[0]},
            )
            request_id_var.reset(token)


async def send_error(send: Send, status: int, code: str, message: str, *,
                     headers: list[tuple[bytes, bytes]] | None = None, close: bool = False) -> None:
    """An error response in the service's JSON shape, straight onto the ASGI channel."""
    body = json.dumps({"error": {"code": code, "message": public_message(message)}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------- the key before the body
def _key_check_of(dependant: Dependant) -> Callable[..., None] | None:
    """The API-key dependency (write or read) somewhere in a route's dependency tree, or None."""
    for sub in dependant.dependencies:
        if sub.call in (require_write_key, require_read_key):
            return sub.call
        found = _key_check_of(sub)
        if found is not None:
            return found
    return None


class AuthFirstMiddleware:
    """Answers 401/403 before a byte of the body is read, for every route that depends on an API key.

    FastAPI parses a body before it runs a route's dependencies, so without this a request with no key
    still has its body read and validated (and answered 422 or 413) first. The routes' own key
    dependencies stay the one statement of which endpoint needs a key; this only runs them earlier.
    """

    def __init__(self, app: ASGIApp, router: Router, settings: Settings) -> None:
        self.app = app
        self.router = router
        self.settings = settings
        self._table = route_table(router)  # flattened once, not walked per request (shared with the 405 handler)
        self._checks: dict[int, Callable[..., None] | None] = {}

    def _route(self, scope: Scope) -> BaseRoute | None:
        for route in self._table.routes():
            if route.matches(scope)[0] is Match.FULL:
                return route
        return None

    def _check_of(self, route: BaseRoute) -> Callable[..., None] | None:
        if id(route) not in self._checks:
            self._checks[id(route)] = _key_check_of(route.dependant) if isinstance(route, APIRoute) else None
        return self._checks[id(route)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        check = self._check_of(route) if route is not None else None
        if check is require_write_key or (check is require_read_key and self.settings.protect_reads):
            try:
                check_key(self.settings, bearer_credentials(Headers(scope=scope).get("authorization")))
            except ApiError as err:
                extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (err.headers or {}).items()]
                await send_error(send, err.status, err.code, err.message, headers=extra)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------- the body's size and time
class _BodyRefused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BodyLimitMiddleware:
    """Refuses a body over the size limit with 413, and one that stalls or crawls with 408, while reading it.

    A Content-Length over the limit is refused before a byte is read; a chunked body is counted as it
    arrives and refused at the first chunk past the limit. While the body is arriving each read waits at
    most idle_timeout_s, and the whole body at most total_timeout_s from the start of the request
    (a client sending one byte a second never stalls, but it does run out of time).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, *, idle_timeout_s: float | None = None,
                 total_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    def _limit(self, headers: Headers) -> int:
        """The body limit: a JSON body carries its image as base64 (4 bytes for 3), so it may be 4/3 larger;
        app/json_form.py holds the decoded image to max_bytes itself."""
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type == "application/json" or content_type.endswith("+json"):
            return -(-self.max_bytes // 3) * 4
        return self.max_bytes

    @staticmethod
    def _too_large(limit: int) -> _BodyRefused:
        return _BodyRefused(413, "payload_too_large", f"request body exceeds the limit of {limit:,} bytes")

    def _timeout(self, deadline: float | None) -> float | None:
        """How long the next read may wait: the idle bound, cut to what is left of the total."""
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self.idle_timeout_s is None:
            return left
        return self.idle_timeout_s if left is None else min(self.idle_timeout_s, left)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = self._limit(headers)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            err = self._too_large(limit)
            await send_error(send, err.status, err.code, err.message, close=True)
            return
        deadline = None if self.total_timeout_s is None else time.monotonic() + self.total_timeout_s
        received = 0
        body_done = False
        refused: _BodyRefused | None = None
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done, refused
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self._timeout(deadline))
            except TimeoutError:
                stalled = deadline is None or time.monotonic() < deadline
                why = (f"no request body bytes arrived for {self.idle_timeout_s:g} s" if stalled else
                       f"the request body did not arrive within {self.total_timeout_s:g} s")
                refused = _BodyRefused(408, "request_timeout", why)
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    refused = self._too_large(limit)
                    raise refused
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None:  # the app's own answer to the aborted read (a 400) is replaced by ours
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _BodyRefused:
            pass
        except Exception:
            if refused is None:
                raise
        if refused is not None and not started:
            await send_error(send, refused.status, refused.code, refused.message, close=True)


# ---------------------------------------------------------------------- every error as JSON
class JsonErrorsMiddleware:
    """Rewrites an error response that is not JSON into the service's error shape, keeping its status and headers.

    The routes' own errors are already JSON; this catches what responses outside the app's handlers
    answer themselves, such as a file response's plain-text 400 for a malformed Range and its empty 416.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def _message(status: int, headers: Headers, body: bytes, has_range: bool) -> tuple[str, str]:
        code = HTTP_CODES.get(status, "error")
        if has_range and status == 400:
            code = "invalid_range"
        if status == 416:
            size = headers.get("content-range", "").rpartition("/")[2]
            return code, (f"the requested range is not within the file ({size} bytes)" if size.isdigit()
                          else "the requested range is not satisfiable")
        text = body.decode("utf-8", "replace").strip()
        if not text or len(text) > 200 or not text.isprintable():
            text = f"the request failed with status {status}"
        return code, text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def json_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                headers = Headers(raw=message.get("headers", []))
                if not headers.get("content-type", "").startswith("application/json"):
                    held.update(start=message, body=b"")
                    return
            if held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                start = held["start"]
                raw = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
                code, text = self._message(start["status"], Headers(raw=start.get("headers", [])), held["body"],
                                           "range" in Headers(scope=scope))
                await send_error(send, start["status"], code, text, headers=raw)
                return
            await send(message)

        await self.app(scope, receive, json_send)
