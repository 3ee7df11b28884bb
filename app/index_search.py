"""Index queries on the model worker: concurrent searches share one index call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .model_worker import ModelWorker

if TYPE_CHECKING:  # only a service with an index imports the index package
    from index import SearchResult
    from index.protocol import IndexStore
    from index.search_filter import SearchFilter

_Query = tuple[np.ndarray, int, "float | None", "SearchFilter | None"]  # (vector, k, min_score, filter)


class IndexSearcher:
    """Text-to-image and image-to-image searches, batched like the encodes."""

    def __init__(self, index: IndexStore, worker: ModelWorker) -> None:
        self.index = index
        self._batcher = worker.batcher("search", self._search_batch)

    async def search(
        self, vector: np.ndarray, k: int, min_score: float | None, conditions: SearchFilter | None = None,
    ) -> list[SearchResult]:
        """The k best hits for one query vector, none below min_score, among those `conditions` pass, best first.

        A shared index store that does not answer (a Milvus server down) raises IndexUnavailableError,
        app/errors.py's 503 with Retry-After: the replica holds no copy of the vectors to answer from.
        """
        return await self._batcher.submit((vector, k, min_score, conditions))

    def _search_batch(self, queries: Sequence[_Query]) -> list[list[SearchResult]]:
        """One index search per distinct filter at its largest k, then each query's own min_score and k.

        The cut is made here, not by the index: its min_score is one value per call, and one
        call serves queries with different ones.
        """
        groups: dict[SearchFilter | None, list[int]] = {}
        for at, (_, _, _, conditions) in enumerate(queries):
            groups.setdefault(conditions, []).append(at)
        answers: list[list[SearchResult]] = [[] for _ in queries]
        for conditions, members in groups.items():
            vectors = np.ascontiguousarray(np.stack([queries[at][0] for at in members]), dtype=np.float32)
            found = self.index.search_by_vector(vectors, max(queries[at][1] for at in members), filter=conditions)
            for at, hits in zip(members, found):
                _, k, min_score, _ = queries[at]
                answers[at] = [hit for hit in hits if min_score is None or hit.score >= min_score][:k]
        return answers
