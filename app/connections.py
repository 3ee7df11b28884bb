"""Connection guards under uvicorn's h11 protocol: slow or silent clients are closed, open connections capped.

uvicorn closes an idle keep-alive connection, but a connection that never completes its request
head (never sends a byte, or sends one a second) is kept until the client leaves, bounded only by the
open-file limit. The request body's own limits are in app/middleware.py (BodyLimitMiddleware).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import ServingLimits


def _raw_error(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response in the service's JSON shape, for before h11 has seen a request."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a cap on open connections."""

    header_timeout_s: float = 5.0
    max_connections: int = 512
    retry_after_s: int = 1

    _head_timer: asyncio.TimerHandle | None = None

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

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head has the same deadline

    # ------------------------------------------------------------------ the head deadline
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
        waiting_for_head = self.conn.their_state is h11.IDLE
        leftover_body = self.conn.their_state is h11.SEND_BODY and self.conn.our_state in (h11.DONE, h11.MUST_CLOSE)
        if not (waiting_for_head or leftover_body):
            return  # a request is being handled: its body has the middleware's limits
        partial = bool(self.conn.trailing_data[0]) and waiting_for_head
        self._close_with(_raw_error(
            408, "Request Timeout", "request_timeout",
            f"the request headers did not arrive within {self.header_timeout_s:g} s") if partial else b"")

    def _close_with(self, data: bytes) -> None:
        self._cancel_head_timer()
        if data:
            self.transport.write(data)
        self.transport.close()


def protocol_for(limits: ServingLimits) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, carrying these limits."""

    class Configured(GuardedH11Protocol):
        header_timeout_s = limits.header_timeout_s
        max_connections = limits.max_connections
        retry_after_s = limits.retry_after_s

    return Configured
