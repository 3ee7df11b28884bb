"""What an add writes to Milvus: content-derived ids, which inputs are new, the bytes to keep, the row itself."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..additions import PendingImage
from ..errors import IndexStoreError
from ..files import resolve_inside
from ..search_filter import parse_utc
from ..types import AddReport
from .connection import CAPTION_BYTES, PATH_BYTES
from .files import chunk_count


def content_id(sha256: str) -> int:
    """The id of an image: the first 62 bits of its content hash (GET /images/{id} takes ids below 2**62).

    Replicas adding the same image at once derive the same id and write one row; no counter is shared.
    """
    return int(sha256[:16], 16) >> 2


def unit_rows(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Rows of `vectors` as unit float32 vectors (inner product is then cosine), refusing a wrong shape or NaN."""
    arr = np.asarray(vectors, dtype=np.float32)
    arr = arr[None, :] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise IndexStoreError(f"expected vectors of shape (n, {dim}), got {tuple(np.shape(vectors))}")
    if not np.isfinite(arr).all():
        raise IndexStoreError("vectors contain NaN or infinite values")
    return (arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def plan_adds(pending: Sequence[PendingImage], known: Mapping[int, str]) -> tuple[list[PendingImage], AddReport]:
    """The new entries (a path keeps only its last new content), and the report of the others.

    known maps ids already in the collection to their content hash; content already there (or
    earlier in `pending`) is a duplicate, an id held by other content a (62-bit) collision.
    """
    report = AddReport()
    fresh: dict[str, PendingImage] = {}
    holders: dict[int, str] = dict(known)
    for p in pending:
        image_id = content_id(p.image.sha256)
        holder = holders.get(image_id)
        if holder is not None and holder != p.image.sha256:
            report.failed.append((p.name, f"its content id {image_id} is held by other content (a hash prefix collision)"))
        elif holder is not None:
            report.duplicates.append((p.name, image_id))
        else:
            holders[image_id] = p.image.sha256
            fresh.pop(p.image.path, None)
            fresh[p.image.path] = p
    return list(fresh.values()), report


def stored_content(p: PendingImage, root: Path | None, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(bytes to store or None when there are none, None) or (None, why the entry is refused)."""
    im = p.image
    if len(im.path.encode("utf-8")) > PATH_BYTES or (im.caption and len(im.caption.encode("utf-8")) > CAPTION_BYTES):
        return None, f"path or caption longer than the Milvus store keeps ({PATH_BYTES} / {CAPTION_BYTES} bytes of UTF-8)"
    source: Path | bytes | None = p.upload
    if source is None and root is not None:
        try:
            candidate = resolve_inside(root, im.path)
        except IndexStoreError as exc:
            return None, str(exc)
        source = candidate if candidate.is_file() else None
    if source is None:
        return None, None
    try:
        size = len(source) if isinstance(source, (bytes, bytearray)) else Path(source).stat().st_size
        if size > max_bytes:
            return None, f"{size:,} bytes; the Milvus store keeps images up to {max_bytes:,} bytes"
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except OSError as exc:
        return None, f"cannot read it again to store it: {exc.strerror or exc}"
    if hashlib.sha256(data).hexdigest() != im.sha256:
        return None, "its content changed while it was being added"
    return data, None


def image_row(p: PendingImage, size: int, added: str) -> dict[str, Any]:
    """The collection row of a new entry whose stored bytes number `size` (0: none stored)."""
    im = p.image
    return {
        "id": content_id(im.sha256), "vector": np.asarray(p.vector, np.float32).tolist(), "path": im.path,
        "caption": im.caption, "width": int(im.width), "height": int(im.height), "sha256": im.sha256,
        "added": added, "added_s": parse_utc(added, "added"), "size_bytes": int(size), "chunks": chunk_count(size),
    }
