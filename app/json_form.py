"""The JSON form of the image endpoints: a base64 image field -> the bytes a multipart upload would carry.

The decoded size counts against the same limit as an upload (max_upload_bytes), priced from the text's
length before anything is decoded; the bytes then go through the same priced, gated decode (app/decode.py).
"""

from __future__ import annotations

import binascii
import re

import torch
from starlette.concurrency import run_in_threadpool

from .decode import ImageDecoder
from .errors import ApiError

_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)
_WHITESPACE = re.compile(rb"\s+")


async def decode_base64_image(text: str, *, max_bytes: int, field: str = "image") -> bytes:
    """A JSON body's base64 image -> its bytes: 422 for bad base64 or nothing, 413 past max_bytes decoded.

    A `data:image/...;base64,` prefix is accepted, and so are line breaks (MIME-wrapped base64).
    """
    match = _DATA_URL.match(text[:256])
    raw = text[match.end():] if match else text
    try:
        encoded = raw.encode("ascii")
    except UnicodeEncodeError:
        raise ApiError(422, "invalid_base64", f"{field} is not base64: it has characters outside ASCII") from None
    if len(encoded) // 4 * 3 > max_bytes + 2:  # priced before decoding: base64 is 4 characters per 3 bytes
        raise ApiError(413, "payload_too_large", f"{field} decodes to more than the limit of {max_bytes:,} bytes")
    try:
        data = await run_in_threadpool(_b64decode, encoded)
    except binascii.Error as exc:
        raise ApiError(422, "invalid_base64", f"{field} is not valid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise ApiError(413, "payload_too_large", f"{field} decodes to {len(data):,} bytes; the limit is {max_bytes:,}")
    if not data:
        raise ApiError(422, "empty_image", f"{field} is empty")
    return data


def _b64decode(encoded: bytes) -> bytes:
    return binascii.a2b_base64(_WHITESPACE.sub(b"", encoded), strict_mode=True)


async def read_base64_image(decoder: ImageDecoder, text: str, *, max_bytes: int) -> torch.Tensor:
    """A JSON body's base64 image -> preprocessed (3, S, S) tensor, like dependencies.read_image for an upload."""
    return await decoder.preprocess(await decode_base64_image(text, max_bytes=max_bytes))
