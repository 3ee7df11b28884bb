"""Vector search restricted to the images a SearchFilter passes: the best k among them, never a cut-down top k.

The passing ids come from the metadata's columns (index/filter_columns.py). Their stored vectors
(exact, or the float16 copies the approximate types re-rank with) are scanned with a selector
that skips everything else: exact among them, at a cost that grows with the index and with how
many pass. When many pass, the approximate types' own search runs with the selector instead,
its candidate list widened in proportion to how few pass, and a query that still comes back
short of k hits while k pass is answered by the scan. The crossover is in docs/benchmarks.md
(Filtered search).
"""

from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np

from . import backends

SCAN_WEIGHT = 2000  # scan while passing**2 <= SCAN_WEIGHT * stored: the graph's cost grows as stored / passing
MAX_EF = 4096  # the widest graph search a selective filter may ask for


class StoredVectors:
    """Where each id lives in an id-mapped FAISS index, worked out once per snapshot on first use.

    Two threads that race to build it build the same thing; one of them is kept.
    """

    def __init__(self, index: faiss.Index, kind: str) -> None:
        self.kind = kind
        self.index = index
        self._lock = threading.Lock()
        self._lookup: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def mapped(self) -> bool:
        """Codes-only IVF-PQ keeps no id map and no exact vectors."""
        return backends.id_mapped(self.index)

    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._lookup is None:
            ids = faiss.vector_to_array(faiss.downcast_index(self.index).id_map).astype(np.int64)
            order = np.argsort(ids, kind="stable")
            lookup = (ids, ids[order], order.astype(np.int64))
            with self._lock:
                self._lookup = self._lookup or lookup
        return self._lookup

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        ids = self._tables()[0]
        return np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    def held_ids(self) -> np.ndarray:
        """Every id this index stores, sorted."""
        return self._tables()[1]

    def _found(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For sorted `ids`: where each would sit among the sorted stored ids, and whether it is there."""
        sorted_ids = self._tables()[1]
        if not len(sorted_ids):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return at, sorted_ids[at] == ids

    def held(self, ids: np.ndarray) -> np.ndarray:
        """The ones among sorted `ids` that this index stores."""
        return ids[self._found(ids)[1]]

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """Positions of the ids the index holds (every passing id: metadata and index are one generation)."""
        at, there = self._found(ids)
        return self._tables()[2][at[there]]


class _Bitmap:
    """A FAISS selector over positions; it reads the bitmap, so both live as long as this object."""

    def __init__(self, positions: np.ndarray, ntotal: int) -> None:
        mask = np.zeros(ntotal, dtype=bool)
        mask[positions] = True
        self.bits = np.packbits(mask, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(ntotal, faiss.swig_ptr(self.bits))


def _scan(stored: StoredVectors, queries: np.ndarray, k: int, chosen: _Bitmap) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k among the chosen positions of the stored vectors."""
    params = faiss.SearchParameters()
    params.sel = chosen.selector
    storage = backends.storage_of(stored.index, stored.kind)
    scores, positions = backends.as_cosines(storage, storage.search(queries, k, params=params))
    return scores, stored.ids_at(positions)


def _widened(wanted: int, share: float, ceiling: int) -> int:
    return int(min(ceiling, max(wanted, np.ceil(wanted / share))))


def _graph_or_lists(
    stored: StoredVectors, queries: np.ndarray, k: int, chosen: _Bitmap, share: float,
    params: dict[str, Any], ef_search: int | None, nprobe: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The approximate type's own search (the inner index, which sees positions) over the chosen ones."""
    inner = faiss.downcast_index(faiss.downcast_index(stored.index).index)
    graph_params = faiss.SearchParametersHNSW()
    graph_params.efSearch = _widened(max(int(ef_search or params.get("ef_search", 128)), k), share, MAX_EF)
    graph_params.sel = chosen.selector
    if stored.kind == "hnsw":
        scores, positions = inner.search(queries, k, params=graph_params)
        return scores, stored.ids_at(positions)
    refine_params = faiss.IndexRefineSearchParameters()
    refine_params.k_factor = float(params.get("refine_k_factor") or 4)
    refine_params.base_index_params = graph_params
    if stored.kind == "ivfpq":
        ivf = faiss.extract_index_ivf(inner.base_index)
        ivf_params = backends.ivf_search_params(_widened(int(nprobe or params.get("nprobe", 32)), share, int(ivf.nlist)))
        ivf_params.sel = chosen.selector
        refine_params.base_index_params = ivf_params
    scores, positions = backends.as_cosines(inner, inner.search(queries, k, params=refine_params))
    return scores, stored.ids_at(positions)


def _codes_only(
    index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray, share: float,
    params: dict[str, Any], nprobe: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Codes-only IVF-PQ holds external ids and no exact vectors: its lists, widened, over the allowed ids."""
    ivf = faiss.extract_index_ivf(index)
    search_params = backends.ivf_search_params(_widened(int(nprobe or params.get("nprobe", 32)), share, int(ivf.nlist)))
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
    search_params.sel = selector
    return backends.as_cosines(index, index.search(queries, k, params=search_params))


def search_filtered(
    *, stored: StoredVectors, queries: np.ndarray, k: int, allowed: np.ndarray,
    params: dict[str, Any], ef_search: int | None = None, nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n, min(k, len(allowed))), of the best hits among `allowed` (sorted live ids)."""
    k = min(k, len(allowed))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    ntotal = int(stored.index.ntotal)
    share = len(allowed) / max(ntotal, 1)
    if not stored.mapped:
        return _codes_only(stored.index, queries, k, allowed, share, params, nprobe)
    chosen = _Bitmap(stored.positions_of(allowed), ntotal)
    if stored.kind == "flat" or len(allowed) ** 2 <= SCAN_WEIGHT * ntotal:
        return _scan(stored, queries, k, chosen)
    scores, ids = _graph_or_lists(stored, queries, k, chosen, share, params, ef_search, nprobe)
    short = np.flatnonzero((ids < 0).any(axis=1))
    if len(short):
        scores, ids = scores.copy(), ids.copy()
        scores[short], ids[short] = _scan(stored, queries[short], k, chosen)
    return scores, ids
