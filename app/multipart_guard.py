"""Multipart bodies the form parser would misread are refused instead of half-read.

Two ways a multipart body loses data without an error from Starlette and python-multipart:
- a charset that is not ASCII-compatible (`charset=utf-16`) garbles every field name, so the
  labels the client sent are ignored and the server's defaults answer with a 200: 415
  `unsupported_charset` before the body is read;
- a body that ends without its closing boundary (`--BOUNDARY--`) has its last part dropped
  silently (python-multipart's finalize does not check that the message ended): 400
  `incomplete_multipart`, raised while the body is read, so the route never runs on the parts
  that did arrive.
A charset Python has no text codec for (base64, an unknown name) is left to app/forms.py, which
holds text fields to UTF-8 there.
"""

from __future__ import annotations

import codecs

from starlette.datastructures import Headers
from starlette.formparsers import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .forms import FormError
from .middleware import send_error

# What a multipart body's structure is written in: a charset must decode these bytes to the same text.
_STRUCTURE = bytes(range(0x20, 0x7F)) + b"\r\n\t"


class MultipartRefused(FormError):
    """A FormError (the app's error shape with its own code) with a status other than 422."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status_code = status


def ascii_compatible(charset: str) -> bool | None:
    """True when the charset reads ASCII as ASCII, False when it does not, None for no text codec."""
    try:
        codecs.lookup(charset)
        return _STRUCTURE.decode(charset) == _STRUCTURE.decode("ascii")
    except LookupError:  # unknown, or a bytes-to-bytes codec such as base64
        return None
    except (UnicodeDecodeError, ValueError):
        return False


class _ClosingBoundary:
    """Watches a body arrive for the closing delimiter CRLF--BOUNDARY-- (or the body starting with it)."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"\r\n--" + boundary + b"--"
        self.tail = b"\r\n"  # the body may open with the delimiter itself (a form with no parts)
        self.seen = False

    def feed(self, chunk: bytes) -> None:
        if self.seen or not chunk:
            return
        window = self.tail + chunk
        self.seen = self.delimiter in window
        self.tail = window[-(len(self.delimiter) - 1):]


class MultipartGuardMiddleware:
    """Refuses multipart/form-data bodies with a non-ASCII-compatible charset or no closing boundary."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type, params = parse_options_header(Headers(scope=scope).get("content-type"))
        if content_type != b"multipart/form-data":
            await self.app(scope, receive, send)
            return
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        if ascii_compatible(charset) is False:
            await send_error(send, 415, "unsupported_charset",
                             f"multipart charset {charset!r} does not encode the form's field names as ASCII; "
                             "send the form as UTF-8 (or leave the charset out)", close=True)
            return
        boundary = params.get(b"boundary")
        if not boundary:  # the parser answers this one itself ("Missing boundary in multipart")
            await self.app(scope, receive, send)
            return
        closing = _ClosingBoundary(boundary)

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                closing.feed(message.get("body", b""))
                if not message.get("more_body", False) and not closing.seen:
                    raise MultipartRefused(
                        400, "incomplete_multipart",
                        "the multipart body ends without its closing boundary (--BOUNDARY--), so its last part may "
                        "be cut short; nothing was processed, send the whole form again")
            return message

        await self.app(scope, watched_receive, send)
