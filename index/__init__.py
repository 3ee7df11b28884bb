"""Image index: FAISS embeddings + SQLite metadata + manifest, bound to one checkpoint.

Depends on model; on training only in `index build`, for its data specs (--data) and, under torchrun,
its process group (distributed_build.py). image_index.py is the API; snapshot.py the reads, additions.py the
de-duplicated adds, commit.py the generation writes, store.py the on-disk layout and its
atomic switch.
"""

from .backends import INDEX_TYPES, IndexParams
from .errors import (
    IndexExistsError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStoreError,
    PathOutsideRootError,
)
from .image_index import ImageIndex
from .metadata import ImageRecord
from .types import AddReport, NewImage, SearchResult

ImageIndexError = IndexStoreError  # the base class of every error the index raises

__all__ = [
    "INDEX_TYPES", "AddReport", "ImageIndex", "ImageIndexError", "ImageRecord", "IndexExistsError", "IndexMismatchError",
    "IndexNotFoundError", "IndexParams", "IndexStoreError", "NewImage", "PathOutsideRootError", "SearchResult",
]
