"""Image bytes kept in Milvus, so every replica serves GET /images/{id} without a shared disk.

The companion collection COLLECTION__files holds each image as base64 chunks (key "ID:SEQ",
48,000 raw bytes a row) and one record "meta" binding the collection to its checkpoint. A
replica that serves an image writes it once into a local cache named by the content hash
(checked on the way in), so a cached file can never be stale; the cache is bounded and evicts
the least recently served files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from model.fileio import write_atomic
from model.image import IMAGE_SUFFIXES

from ..errors import IndexStoreError
from ..locations import MilvusLocation
from .connection import (
    CHUNK_BYTES,
    QUERY_LIMIT,
    STRONG,
    MilvusClient,
    files_collection,
    in_list,
    milvus_errors,
)

META_KEY = "meta"
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
DEFAULT_CACHE_BYTES = 1024 * 1024 * 1024
CACHE_ENV = "CLIPFORGE_MILVUS_CACHE"
_UPSERT_BYTES = 16 * 1024 * 1024  # chunk data per upsert call, well inside gRPC's message limit
_KEEP_RECENT_S = 120.0  # a file served this recently is never evicted (a response may still be sending it)


def chunk_rows(image_id: int, data: bytes) -> list[dict[str, Any]]:
    return [
        {"key": f"{image_id}:{seq}", "image_id": int(image_id), "seq": seq, "unused": [0.0, 0.0],
         "data": base64.b64encode(data[start:start + CHUNK_BYTES]).decode("ascii")}
        for seq, start in enumerate(range(0, len(data), CHUNK_BYTES))
    ]


def chunk_count(size: int) -> int:
    return -(-size // CHUNK_BYTES)


class ImageFiles:
    """Reads and writes image bytes and the binding record in the companion collection."""

    def __init__(self, client: MilvusClient, where: MilvusLocation, cache_dir: Path | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._client, self._where = client, where
        self._name = files_collection(where.collection)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(where)
        self.cache_bytes = int(cache_bytes)

    # ------------------------------------------------------------------ binding record
    def read_meta(self) -> dict[str, Any] | None:
        with milvus_errors(self._where, "reading the index record"):
            rows = self._client.get(self._name, ids=[META_KEY], output_fields=["data"], consistency_level=STRONG)
        if not rows:
            return None
        try:
            meta = json.loads(rows[0]["data"])
        except (TypeError, ValueError) as exc:
            raise IndexStoreError(f"Milvus {self._where.text}: the index record is damaged") from exc
        return meta if isinstance(meta, dict) else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        row = {"key": META_KEY, "image_id": -1, "seq": 0, "unused": [0.0, 0.0], "data": json.dumps(meta)}
        with milvus_errors(self._where, "writing the index record"):
            self._client.upsert(self._name, [row])

    # ------------------------------------------------------------------ image bytes
    def store(self, items: Sequence[tuple[int, bytes]]) -> None:
        """Write the bytes of (id, content) pairs; done before their vector rows make them visible."""
        batch: list[dict[str, Any]] = []
        size = 0
        with milvus_errors(self._where, "storing image bytes"):
            for image_id, data in items:
                for row in chunk_rows(image_id, data):
                    batch.append(row)
                    size += len(row["data"])
                    if size >= _UPSERT_BYTES:
                        self._client.upsert(self._name, batch)
                        batch, size = [], 0
            if batch:
                self._client.upsert(self._name, batch)

    def delete(self, image_ids: Iterable[int]) -> None:
        ids = sorted({int(i) for i in image_ids})
        with milvus_errors(self._where, "deleting image bytes"):
            for start in range(0, len(ids), 1000):
                self._client.delete(self._name, filter=in_list("image_id", ids[start:start + 1000]))

    def fetch(self, image_id: int, chunks: int, sha256: str) -> bytes:
        """The stored bytes of one image, checked against its content hash."""
        if chunks > QUERY_LIMIT:
            raise IndexStoreError(f"image {image_id} is stored in {chunks} chunks, more than one query returns")
        with milvus_errors(self._where, f"reading image {image_id}"):
            rows = self._client.query(self._name, filter=f"image_id == {int(image_id)}", output_fields=["seq", "data"],
                                      limit=max(chunks, 1), consistency_level=STRONG)
        rows.sort(key=lambda r: r["seq"])
        data = b"".join(base64.b64decode(r["data"]) for r in rows)
        if len(rows) != chunks or hashlib.sha256(data).hexdigest() != sha256:
            raise IndexStoreError(f"the stored bytes of image {image_id} are incomplete or damaged")
        return data

    def count_chunks(self, image_ids: Sequence[int]) -> dict[int, int]:
        """Chunk rows per image id (verify)."""
        counts: dict[int, int] = {}
        with milvus_errors(self._where, "counting image bytes"):
            for start in range(0, len(image_ids), 500):
                part = image_ids[start:start + 500]
                it = self._client.query_iterator(self._name, batch_size=4096, filter=in_list("image_id", part),
                                                 output_fields=["image_id"], consistency_level=STRONG)
                try:
                    while rows := it.next():
                        for r in rows:
                            counts[int(r["image_id"])] = counts.get(int(r["image_id"]), 0) + 1
                finally:
                    it.close()
        return counts

    # ------------------------------------------------------------------ local cache
    def cached_file(self, image_id: int, *, chunks: int, sha256: str, stored_path: str) -> Path:
        """A local file holding the image (fetched once per replica; named by its hash and suffix)."""
        suffix = Path(stored_path).suffix.lower()
        target = self.cache_dir / f"{sha256}{suffix if suffix in IMAGE_SUFFIXES else ''}"
        if target.is_file():
            os.utime(target)
            return target
        data = self.fetch(image_id, chunks, sha256)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data)
        self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        """Drop the least recently served files until the cache fits (never one served in the last minutes)."""
        try:
            entries = [(e.stat().st_mtime, e.stat().st_size, e) for e in os.scandir(self.cache_dir) if e.is_file()]
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        now = time.time()
        for mtime, size, entry in sorted(entries, key=lambda t: t[0]):
            if total <= self.cache_bytes:
                break
            if entry.path == str(keep) or now - mtime < _KEEP_RECENT_S:
                continue
            try:
                os.unlink(entry.path)
                total -= size
            except OSError:
                pass


def default_cache_dir(where: MilvusLocation) -> Path:
    """$CLIPFORGE_MILVUS_CACHE, else a folder in the temporary directory, per server and collection."""
    base = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "clipforge-milvus-cache")
    tag = hashlib.sha256(f"{where.uri}/{where.collection}".encode()).hexdigest()[:12]
    return base / f"{where.collection}-{tag}"
