"""Index queries on the model worker: concurrent searches share one index call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .model_worker import ModelWorker

if TYPE_CHECKING:  # only a service with an index imports the index package
    from index import SearchResult
    from index.protocol import IndexStore

_Query = tuple[np.ndarray, int, float | None]  # (vector, k, min_score)


class IndexSearcher:
    """Text-to-image and image-to-image searches, batched like the encodes."""

    def __init__(self, index: IndexStore, worker: ModelWorker) -> None:
        self.index = index
        self._batcher = worker.batcher("search", self._search_batch)

    async def search(self, vector: np.ndarray, k: int, min_score: float | None) -> list[SearchResult]:
        """The k best hits for one query vector, none below min_score, best first.

        A shared index store that does not answer (a Milvus server down) raises IndexUnavailableError,
        app/errors.py's 503 with Retry-After: the replica holds no copy of the vectors to answer from.
        """
        return await self._batcher.submit((vector, k, min_score))

    def _search_batch(self, queries: Sequence[_Query]) -> list[list[SearchResult]]:
        """One index search at the largest k, then each query's own min_score and k.

        The cut is made here, not by the index: its min_score is one value per call, and one
        call serves queries with different ones.
        """
        vectors = np.ascontiguousarray(np.stack([vec for vec, _, _ in queries]), dtype=np.float32)
        found = self.index.search_by_vector(vectors, max(k for _, k, _ in queries))
        return [
            [hit for hit in hits if min_score is None or hit.score >= min_score][:k]
            for hits, (_, k, min_score) in zip(found, queries)
        ]
