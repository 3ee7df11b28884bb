"""Connection guards under uvicorn's httptools protocol: slow or silent clients are closed, heads and
open connections capped.

uvicorn closes an idle keep-alive connection, but a connection that never completes its request
head (never sends a byte, or sends one a second) is kept until the client leaves, bounded only by the
open-file limit, and httptools parses a head of any length. The request body's own limits are in
app/middleware.py (BodyLimitMiddleware). httptools (llhttp, C) rather than h11 (pure Python): it
parses a request in a fraction of the CPU time, which the model thread shares on a small machine
(docs/benchmarks.md, Serving against the peers).
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .limits import ServingLimits


def _raw_error(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response in the service's JSON shape, for before the app has seen a request."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode("latin-1") + body


MAX_URL_BYTES = 65535  # httptools.parse_url refuses longer URLs


class HeadTooLarge(Exception):
    """Raised from a parser callback (the parser then fails): the URL or the whole head is over its limit."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap for each request head, and a cap on
    open connections."""

    header_timeout_s: float = 5.0
    max_connections: int = 512
    max_head_bytes: int = 2 * 1024 * 1024
    retry_after_s: int = 1

    _head_timer: asyncio.TimerHandle | None = None
    _message_open = False  # between on_message_begin and on_message_complete
    _head_done = False  # this message's headers are complete
    _head_bytes = 0  # request line and header bytes of the message being parsed
    _pending = False  # bytes of a new request have arrived and its head is not complete
    _url_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._close_with(_raw_error(
                503, "Service Unavailable", "overloaded",
                f"the server has its limit of {self.max_connections:,} open connections; retry shortly",
                extra=f"retry-after: {self.retry_after_s}\r\n"))
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_head():
            self._pending = True
        super().data_received(data)  # a parse error, a callback's HeadTooLarge included, calls send_400_response

    def send_400_response(self, msg: str) -> None:
        """uvicorn's plain-text answer to a request it cannot parse, in the service's JSON error shape."""
        if self._url_bytes > MAX_URL_BYTES:
            self._close_with(_raw_error(
                414, "URI Too Long", "uri_too_long", f"the request URL exceeds {MAX_URL_BYTES:,} bytes"))
        elif self._head_bytes > self.max_head_bytes:
            self._close_with(_raw_error(
                431, "Request Header Fields Too Large", "headers_too_large",
                f"the request line and headers exceed {self.max_head_bytes:,} bytes"))
        else:
            self._close_with(_raw_error(400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1"))

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_open, self._head_done, self._head_bytes, self._url_bytes = True, False, 0, 0

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > MAX_URL_BYTES:
            raise HeadTooLarge
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done, self._pending = True, False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._message_open = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head has the same deadline

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:
            raise HeadTooLarge

    # ------------------------------------------------------------------ the head deadline
    def _waiting_for_head(self) -> bool:
        """No request is being handled: between requests, or inside a head not yet complete."""
        if self._message_open and not self._head_done:
            return True
        return not self._message_open and (self.cycle is None or self.cycle.response_complete)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        """Close a connection still without a complete request head, or still sending a body nobody reads."""
        self._head_timer = None
        if self.transport.is_closing():
            return
        leftover_body = (self._message_open and self._head_done and self.cycle is not None
                         and self.cycle.response_complete)
        if not (self._waiting_for_head() or leftover_body):
            return  # a request is being handled: its body has the middleware's limits
        partial = self._pending and not leftover_body
        self._close_with(_raw_error(
            408, "Request Timeout", "request_timeout",
            f"the request headers did not arrive within {self.header_timeout_s:g} s") if partial else b"")

    def _close_with(self, data: bytes) -> None:
        self._cancel_head_timer()
        if data:
            self.transport.write(data)
        self.transport.close()


def protocol_for(limits: ServingLimits, *, max_head_bytes: int) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, carrying these limits."""

    class Configured(GuardedHttpToolsProtocol):
        header_timeout_s = limits.header_timeout_s
        max_connections = limits.max_connections
        retry_after_s = limits.retry_after_s

    Configured.max_head_bytes = max_head_bytes
    return Configured
