"""The delta segment: where small writes to a large index go, so an add does not rewrite the whole index.

A generation holds its main FAISS index (index.faiss) and, once that holds SEGMENT_FROM
vectors, a delta segment (delta.faiss) of the vectors added since it was last written: a
flat index beside a flat one, an HNSW graph beside the graph and inverted-list types. An
add copies and rewrites only the delta and shares the main file with the previous
generation by a hard link; a removal of a delta vector edits the delta, one of a main vector
becomes a tombstone (or a physical removal on a flat index). Past delta_capacity the delta is
folded into the main index by the next write. Both parts are searched and the two top-k
lists merged, so the answer is that of one index over all vectors. Commits stay the
generation switch of store.py, so a kill -9 at any moment leaves the old or the new
generation, never a mix.
"""

from __future__ import annotations

import numpy as np

from .backends import IndexParams

DELTA_FILE = "delta.faiss"
SEGMENT_FROM = 20_000  # main indexes smaller than this are rewritten on every write (it costs little)
DELTA_SHARE = 0.05  # the delta is folded in past this share of the main index ...
DELTA_MAX = 100_000  # ... or this many vectors, whichever is smaller (a delta search stays well under 1 ms)
# A small graph reaches the main index's recall with a far shorter build-time candidate list, and inserting
# into it is then 2.6x cheaper (docs/benchmarks.md, Small writes): 10,000 vectors in seconds on 2 cores.
DELTA_EF_CONSTRUCTION = 40


def delta_kind(main_kind: str) -> str:
    """Exact beside exact; beside the approximate types, a float32 HNSW graph (small, fast to extend)."""
    return "flat" if main_kind == "flat" else "hnsw"


def delta_params(main: IndexParams) -> IndexParams:
    """The main index's parameters with the delta's cheaper graph construction."""
    return main.model_copy(update={"ef_construction": min(main.ef_construction, DELTA_EF_CONSTRUCTION)})


def delta_capacity(main_count: int) -> int:
    """How many vectors the delta may hold beside a main index of `main_count` (0: no delta)."""
    if main_count < SEGMENT_FROM:
        return 0
    return max(1, min(DELTA_MAX, int(DELTA_SHARE * main_count)))


def merge_top(
    first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of two (scores, ids) result lists per query row; missing results (id -1) sort last."""
    scores = np.concatenate([first[0], second[0]], axis=1).astype(np.float32)
    ids = np.concatenate([first[1], second[1]], axis=1).astype(np.int64)
    ranked = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
