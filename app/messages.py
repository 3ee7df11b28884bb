"""Error text as clients see it: no object reprs or heap addresses, whichever layer wrote the message."""

from __future__ import annotations

import re

# "<_io.BytesIO object at 0x7f...>", "<PIL.PngImagePlugin.PngImageFile image mode=RGB size=1x1 at 0x7F...>"
_OBJECT_REPR = re.compile(r"<[A-Za-z_][\w.]*(?: [^<>]*?)? at 0x[0-9A-Fa-f]+>")
_ADDRESS = re.compile(r"\b0x[0-9A-Fa-f]{8,}\b")


def public_message(text: str) -> str:
    """The message with any object repr replaced by 'the upload' and any bare address dropped."""
    cleaned = _OBJECT_REPR.sub("the upload", text)
    cleaned = _ADDRESS.sub("", cleaned)
    return re.sub(r"  +", " ", cleaned).strip()
