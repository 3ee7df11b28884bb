"""The Milvus index store: ImageIndex's operations on a Milvus collection shared by several service replicas.

Only this package imports pymilvus (and milvus-lite), and only when a milvus location is opened.
"""

from __future__ import annotations

from ..locations import MilvusLocation
from .connection import (
    MilvusUnavailableError,
    connect,
    disconnect,
    files_collection,
    milvus_errors,
)
from .store import MilvusImageIndex, content_id


def collection_exists(where: MilvusLocation) -> bool:
    """Whether the location's collection (or its companion) exists already."""
    client = connect(where)
    try:
        with milvus_errors(where, "looking for the collection"):
            return any(client.has_collection(n) for n in (where.collection, files_collection(where.collection)))
    finally:
        disconnect(client, where)


__all__ = ["MilvusImageIndex", "MilvusUnavailableError", "collection_exists", "content_id"]
