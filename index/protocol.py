"""IndexStore: what the CLI and the service call on an index, met by ImageIndex (FAISS) and MilvusImageIndex.

Only a description for type checkers and readers: nothing is registered, and neither store
imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .metadata import ImageRecord
from .search_filter import SearchFilter
from .types import AddReport, NewImage, SearchResult

if TYPE_CHECKING:
    from model import CLIPInference


@runtime_checkable
class IndexStore(Protocol):
    """An image index bound to one checkpoint: de-duplicated adds, removal, metadata, k-NN search."""

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def index_type(self) -> str: ...

    def __len__(self) -> int: ...

    def check_model(self, clip: CLIPInference | str) -> None: ...

    def info(self) -> dict[str, Any]: ...

    def verify(self) -> dict[str, int]: ...

    def reload_if_changed(self) -> bool: ...

    def get(self, image_id: int) -> ImageRecord | None: ...

    def records(self, offset: int = 0, limit: int = 100) -> list[ImageRecord]: ...

    def resolve_path(self, image_id: int) -> Path: ...

    def search_by_vector(
        self, vectors: np.ndarray, k: int, min_score: float | None = None, *,
        ef_search: int | None = None, nprobe: int | None = None, filter: SearchFilter | None = None,
    ) -> list[list[SearchResult]]: ...

    def add_files(
        self, clip: CLIPInference, paths: Sequence[str | Path], captions: Sequence[str | None] | None = None, *,
        copy_outside_root: bool = False, batch_size: int = 64, workers: int | None = None, progress: bool = False,
        max_bytes: int | None = None, commit_every: int | None = None,
    ) -> AddReport: ...

    def add_bytes(
        self, clip: CLIPInference, items: Sequence[tuple[str, bytes, str | None]], *, max_bytes: int | None = None
    ) -> AddReport: ...

    def add_embeddings(self, vectors: np.ndarray, images: Sequence[NewImage]) -> AddReport: ...

    def remove(self, targets: Iterable[int | str | Path]) -> int: ...

    def close(self) -> None: ...
