"""Image index: FAISS embeddings + SQLite metadata + manifest, bound to one checkpoint.

Depends on model only. See image_index.py for the API and store.py for the on-disk layout.
"""

from .backends import INDEX_TYPES, IndexParams
from .errors import (
    IndexExistsError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStoreError,
    PathOutsideRootError,
)
from .image_index import AddReport, ImageIndex, NewImage, SearchResult
from .metadata import ImageRecord

IndexError_ = IndexStoreError  # the name the app contract used for the base error

__all__ = [
    "INDEX_TYPES", "AddReport", "ImageIndex", "ImageRecord", "IndexError_", "IndexExistsError", "IndexMismatchError",
    "IndexNotFoundError", "IndexParams", "IndexStoreError", "NewImage", "PathOutsideRootError", "SearchResult",
]
