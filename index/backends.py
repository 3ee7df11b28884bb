"""The three FAISS index types behind one small interface: build, add, remove, search, read back vectors.

flat   exact inner product (IndexIDMap2 over IndexFlatIP); small collections.
hnsw   graph search (IndexIDMap2 over IndexHNSWFlat); cannot delete, so removals are
       tombstones filtered during the search (an IDSelector) and compacted on rebuild.
hnswsq graph search over 8-bit scalar-quantised codes, the candidates (k * refine_k_factor)
       re-scored exactly from float16 copies (IndexIDMap over IndexRefine(IndexHNSWSQ,
       fp16)): about a quarter of HNSW's memory when opened memory-mapped (only the
       graph and the codes a search touches are resident); removals are tombstones.
ivfpq  inverted lists of product-quantised codes, trained on a sample: by default 2-dim
       sub-vectors at 4 bits (an eighth of the float16 size) scanned with FAISS's fast-scan
       SIMD kernels; codes only, 4-dim sub-vectors at 8 bits and the classic kernel. The
       lists nearest a query are found through a small HNSW graph over their centroids.
       It ranks by L2 distance, which orders unit vectors as inner product does (FAISS's
       fast-scan kernels mis-rank inner products across lists: docs/benchmarks.md), and its
       distances d are returned as the cosines 1 - d/2 (as_cosines).
       By default the PQ candidates (k * refine_k_factor) are re-ranked with float16 copies
       of the vectors (memory-mappable), which keeps recall high where PQ alone ranks
       poorly; removals are then tombstones too. refine_k_factor=0 keeps codes only
       (smallest, physical removal, lower recall). It builds 1M vectors in minutes where a
       graph over every vector takes an hour on two cores (docs/benchmarks.md).
All score L2-normalised vectors by cosine similarity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import IndexStoreError

INDEX_TYPES = ("flat", "hnsw", "hnswsq", "ivfpq")
REQUESTABLE = ("auto", *INDEX_TYPES)
# "auto": exact search while a scan stays in the millisecond range, a graph over compressed codes
# with exact re-scoring while building the graph takes minutes, inverted lists beyond.
FLAT_MAX = 100_000
HNSW_MAX = 250_000


class IndexParams(BaseModel):
    """Build-time and default query-time parameters (stored in the manifest)."""

    model_config = ConfigDict(extra="forbid")

    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree")
    ef_construction: int = Field(200, ge=8, le=4096, description="HNSW build-time candidate list")
    ef_search: int = Field(128, ge=1, le=8192, description="HNSW query-time candidate list")
    nlist: int | None = Field(None, ge=1, le=1 << 20, description="IVF lists (default 4*sqrt(n))")
    nprobe: int = Field(24, ge=1, le=1 << 20, description="IVF lists scanned per query")
    pq_m: int | None = Field(None, ge=1, le=1024, description="PQ sub-quantizers (default dim/2 at 4 bits, dim/4 at 8)")
    pq_nbits: int | None = Field(
        None, ge=4, le=12, description="bits per PQ code (default 4, fast-scan kernels; 8 for codes only)",
    )
    train_size: int = Field(100_000, ge=256, description="IVF-PQ training sample size")
    refine_k_factor: int | None = Field(
        None, ge=0, le=256,
        description="IVF-PQ, HNSW-SQ: re-rank k*factor candidates exactly (default 8 and 4; 0: IVF-PQ codes only)",
    )


def parse_params(values: dict[str, Any] | IndexParams | None) -> IndexParams:
    if isinstance(values, IndexParams):
        return values
    try:
        return IndexParams(**{k: v for k, v in (values or {}).items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise IndexStoreError(f"invalid index parameter {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc


def choose_type(requested: str, count: int) -> str:
    if requested not in REQUESTABLE:
        raise IndexStoreError(f"unknown index type {requested!r}; choose one of {', '.join(REQUESTABLE)}")
    if requested != "auto":
        return requested
    return "flat" if count <= FLAT_MAX else "hnswsq" if count <= HNSW_MAX else "ivfpq"


def _pq_m(dim: int, wanted: int | None, nbits: int) -> int:
    if wanted is not None:
        if dim % wanted:
            raise IndexStoreError(f"pq_m={wanted} must divide the embedding size {dim}")
        return wanted
    width = 2 if nbits == 4 else 4  # dimensions a sub-vector: 128 bytes for 512-d either way
    for m in (512, 384, 256, 192, 128, 96, 64, 48, 32, 16, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= width or m == 1:
            return m
    return 1


def default_refine(kind: str) -> int:
    """Candidates re-ranked per result, the smallest that kept recall@10 at 0.98 at 1M (docs/benchmarks.md)."""
    return 8 if kind == "ivfpq" else 4


def _coarse_quantizer(dim: int) -> faiss.Index:
    """An HNSW graph over the IVF centroids: the nearest lists in microseconds rather than a scan of them all."""
    graph = faiss.IndexHNSWFlat(dim, QUANTIZER_M, faiss.METRIC_L2)
    graph.hnsw.efConstruction = QUANTIZER_EF
    graph.hnsw.efSearch = QUANTIZER_EF
    return graph


def new_index(kind: str, dim: int, params: IndexParams, train: np.ndarray | None = None) -> tuple[faiss.Index, dict[str, Any]]:
    """An empty index of the given type (IVF-PQ trained on `train`), and the resolved parameters."""
    resolved = params.model_dump()
    refine = default_refine(kind) if params.refine_k_factor is None else params.refine_k_factor
    if kind in REFINED:  # left unset elsewhere, so a later promotion to a refined type takes that type's default
        resolved.update(refine_k_factor=refine)
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), resolved
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = params.ef_construction
        inner.hnsw.efSearch = params.ef_search
        return faiss.IndexIDMap2(inner), resolved
    if kind == "hnswsq":
        if train is None or len(train) < SQ_MIN_VECTORS:
            raise IndexStoreError(f"an hnswsq index needs at least {SQ_MIN_VECTORS} vectors to train its quantizer")
        graph = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = params.ef_construction
        graph.hnsw.efSearch = params.ef_search
        exact = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        refined = faiss.IndexRefine(graph, exact)
        refined.k_factor = max(refine, 1)
        sample = train
        if len(train) > params.train_size:
            sample = train[np.random.default_rng(0).choice(len(train), params.train_size, replace=False)]
        refined.train(np.ascontiguousarray(sample, dtype=np.float32))
        resolved.update(refine_k_factor=max(refine, 1))
        return faiss.IndexIDMap(refined), resolved
    if kind == "ivfpq":
        n = 0 if train is None else len(train)
        # fast scan ranks more coarsely than the classic kernel: right when the re-ranking repairs it, not without
        nbits = params.pq_nbits or (4 if refine else 8)
        m = _pq_m(dim, params.pq_m, nbits)
        nlist = params.nlist or max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39 or 1))  # >= 39 samples a list
        need = max(nlist, 1 << nbits)
        if n < need:
            raise IndexStoreError(
                f"an ivfpq index needs at least {need} vectors to train (nlist={nlist}, {nbits}-bit codes), "
                f"got {n}; use --type flat or hnsw for small collections"
            )
        sample = train
        if n > params.train_size:
            sample = train[np.random.default_rng(0).choice(n, params.train_size, replace=False)]
        quantizer = _coarse_quantizer(dim)
        if nbits == 4:
            index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, m, 4, faiss.METRIC_L2)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_L2)
        quantizer.this.disown()  # the IVF index frees its quantizer, as it does once read back from a file
        index.own_fields = True
        trainer = faiss.IndexFlatL2(dim)  # k-means assigns by exact batched scans; the graph is built once, after
        index.clustering_index = trainer
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.clustering_index = None
        index.nprobe = min(params.nprobe, nlist)
        resolved.update(nlist=nlist, pq_m=m, pq_nbits=nbits)
        if refine:
            exact = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
            refined = faiss.IndexRefine(index, exact)
            refined.k_factor = refine
            return faiss.IndexIDMap(refined), resolved
        return index, resolved
    raise IndexStoreError(f"unknown index type {kind!r}")


def tune_for_queries(index: faiss.Index) -> faiss.Index:
    """Query-time settings FAISS does not keep in the file: the fast-scan kernel that answers one
    query sooner than FAISS's own pick, as accurately (docs/benchmarks.md, "The search path trimmed")."""
    part = faiss.downcast_index(index)
    while isinstance(part, (faiss.IndexIDMap, faiss.IndexRefine)):
        part = faiss.downcast_index(part.index if isinstance(part, faiss.IndexIDMap) else part.base_index)
    if isinstance(part, faiss.IndexIVFFastScan):
        part.implem = FAST_SCAN_IMPLEM
    return index


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def can_remove(kind: str, params: dict[str, Any]) -> bool:
    """Whether ids can be deleted physically (otherwise they become tombstones)."""
    return kind == "flat" or (kind == "ivfpq" and params.get("refine_k_factor") == 0)


def id_mapped(index: faiss.Index) -> bool:
    """Whether an id map wraps the index. The refined kinds use IndexIDMap: their removals are tombstones, so
    IndexIDMap2's reverse map (about 30 MiB a million vectors) would buy nothing; older files hold IndexIDMap2."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIDMap)


def remove(index: faiss.Index, ids: np.ndarray) -> int:
    return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))) if len(ids) else 0


def stored_ids(index: faiss.Index, kind: str) -> np.ndarray:
    """Every id held by the FAISS index, tombstoned ones included (for consistency checks)."""
    if id_mapped(index):
        return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def storage_of(index: faiss.Index, kind: str) -> faiss.Index:
    """The exact (flat, hnsw) or float16 re-rank (ivfpq, hnswsq) store of an id-mapped index, by position."""
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    if kind == "flat":
        return inner
    if kind == "hnsw":
        return faiss.downcast_index(inner.storage)
    return faiss.downcast_index(inner.refine_index)


def vectors_and_ids(index: faiss.Index, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The exact stored vectors with their ids, for re-indexing as another type or compacting."""
    if not id_mapped(index):
        raise IndexStoreError("this ivfpq index keeps only compressed codes; rebuild it from the images instead")
    ids = faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)
    storage = storage_of(index, kind)
    vecs = storage.reconstruct_n(0, storage.ntotal) if storage.ntotal else np.zeros((0, index.d), np.float32)
    return np.asarray(vecs, dtype=np.float32), ids


class Tombstones:
    """Removed-but-still-stored ids, and the selector that hides them during the search itself.

    HNSW filters external ids (the id map translates them); the re-ranked IVF-PQ and HNSW-SQ
    filter in their inner search, which sees internal positions, so those are selected instead.
    """

    def __init__(self, ids: np.ndarray, index: faiss.Index | None = None, kind: str = "hnsw") -> None:
        self.ids = np.unique(np.asarray(ids, dtype=np.int64))
        hidden = self.ids
        if len(self.ids) and kind in REFINED and index is not None and id_mapped(index):
            hidden = np.flatnonzero(np.isin(stored_ids(index, kind), self.ids)).astype(np.int64)
        self._batch = faiss.IDSelectorBatch(hidden) if len(hidden) else None
        self.selector = faiss.IDSelectorNot(self._batch) if self._batch is not None else None
        self._params: dict[tuple, faiss.SearchParameters] = {}

    def search_params(
        self, key: tuple, make: Callable[[faiss.IDSelector | None], faiss.SearchParameters],
    ) -> faiss.SearchParameters:
        """The search parameters for one knob setting with this selector, made once and shared.

        Building them for every search was a measurable share of a 1M query (docs/benchmarks.md). Concurrent
        searches may share them only where FAISS just reads them: never with a selector on the
        parameters an id map is given (IndexIDMap swaps it for a translated one during the search).
        They live as long as these tombstones (the selector they point to), bounded against arbitrary knobs.
        """
        found = self._params.get(key)
        if found is None:
            if len(self._params) >= _PARAMS_KEPT:
                self._params.clear()
            found = self._params[key] = make(self.selector)
        return found

    def __len__(self) -> int:
        return len(self.ids)


_PARAMS_KEPT = 64  # knob settings whose parameter objects one set of tombstones keeps
_NO_TOMBSTONES = Tombstones(np.empty(0, dtype=np.int64))


def search(
    index: faiss.Index, kind: str, queries: np.ndarray, k: int, params: dict[str, Any],
    tombstones: Tombstones | None = None, ef_search: int | None = None, nprobe: int | None = None,
    half_scan: HalfPrecisionScan | None = None, prefetch: Callable[[np.ndarray, int, Any], int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n, k); missing results have id -1. Query-time knobs never mutate the index.

    prefetch: for a mapped re-ranked index, called with the queries, the candidate count and the
    coarse search's parameters before the search, to read the candidates' rows in parallel.
    """
    marks = tombstones if tombstones is not None else _NO_TOMBSTONES
    if kind in ("hnsw", "hnswsq"):
        ef = max(int(ef_search or params.get("ef_search", 128)), k)
        if kind == "hnsw":  # made per search: the id map swaps a selector on its own parameters while it searches
            return index.search(queries, k, params=_hnsw_params(ef, marks.selector))
        k_factor = float(params.get("refine_k_factor") or 4)
        if prefetch is not None:
            prefetch(queries, int(k * k_factor), _NO_TOMBSTONES.search_params(("hnsw", ef), lambda sel: _hnsw_params(ef, sel)))
        refined = marks.search_params(("hnswsq", ef, k_factor), lambda sel: _refined_params(_hnsw_params(ef, sel), k_factor))
        return index.search(queries, k, params=refined)
    if kind == "ivfpq":
        nprobe = int(nprobe or params.get("nprobe", 32))
        if not id_mapped(index):
            codes_only = marks.search_params(("ivf", nprobe), lambda sel: _ivf_params(nprobe, sel))
            return as_cosines(index, index.search(queries, k, params=codes_only))
        k_factor = float(params.get("refine_k_factor") or 4)
        if prefetch is not None:  # without the tombstones: a few extra rows read, no search changed
            prefetch(queries, int(k * k_factor), _NO_TOMBSTONES.search_params(("ivf", nprobe), lambda sel: _ivf_params(nprobe, sel)))
        refined = marks.search_params(("ivfpq", nprobe, k_factor), lambda sel: _refined_params(_ivf_params(nprobe, sel), k_factor))
        return as_cosines(index, index.search(queries, k, params=refined))
    if half_scan is not None and len(queries) == 1:
        return half_scan.search(queries, k)
    # The per-query scan wins for one query, BLAS from two (docs/benchmarks.md). The threshold is
    # process-wide: a concurrent reader may see the other's setting, which changes speed, not results.
    faiss.cvar.distance_compute_blas_threshold = 2 if len(queries) > 1 else 1 << 30
    return index.search(queries, k)


def _with_selector(search_params: faiss.SearchParameters, selector: faiss.IDSelector | None) -> faiss.SearchParameters:
    if selector is not None:
        search_params.sel = selector
    return search_params


def _hnsw_params(ef: int, selector: faiss.IDSelector | None) -> faiss.SearchParametersHNSW:
    out = faiss.SearchParametersHNSW()
    out.efSearch = ef
    return _with_selector(out, selector)


def _ivf_params(nprobe: int, selector: faiss.IDSelector | None) -> faiss.SearchParametersIVF:
    return _with_selector(ivf_search_params(nprobe), selector)


def _refined_params(base: faiss.SearchParameters, k_factor: float) -> faiss.IndexRefineSearchParameters:
    out = faiss.IndexRefineSearchParameters()
    out.k_factor = k_factor
    out.base_index_params = base
    return out


def ivf_search_params(nprobe: int) -> faiss.SearchParametersIVF:
    """nprobe lists, found through the centroid graph with a candidate list just wide enough for them."""
    coarse = faiss.SearchParametersHNSW()  # a flat quantizer ignores it
    coarse.efSearch = max(nprobe, QUANTIZER_EF_SEARCH)
    ivf_params = faiss.SearchParametersIVF()
    ivf_params.nprobe = nprobe
    ivf_params.quantizer_params = coarse
    return ivf_params


def as_cosines(index: faiss.Index, result: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) as cosine similarities: an L2 index's squared distances d between unit vectors are 1 - d/2.

    The scores are converted in place: `result` is a search's own fresh output.
    """
    scores, ids = result
    if index.metric_type == faiss.METRIC_L2:
        scores *= -0.5
        scores += 1.0
        missing = ids < 0
        if missing.any():
            scores[missing] = -np.inf
    return scores, ids


class HalfPrecisionScan:
    """A float16 copy of a flat index's vectors that makes single-query exact search twice as fast.

    One query scans every stored vector and is memory-bound, so reading 2 bytes per component
    instead of 4 halves it (docs/benchmarks.md, Index). The answer stays
    exact: rounding to float16 moves a score q.x by at most |q| |x| 2^-11, so every vector whose
    float16 score is within twice that of the k-th best is re-scored from the float32 store,
    and the candidate pool grows until it covers that margin.
    """

    MIN_VECTORS = 20_000  # below this the float32 scan takes about a millisecond anyway

    def __init__(self, index: faiss.Index) -> None:
        idmap = faiss.downcast_index(index)
        inner = faiss.downcast_index(idmap.index)
        n, d = int(inner.ntotal), int(index.d)
        self._index = index  # owns the float32 storage that _vectors views
        self._vectors = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d)
        self._ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
        self._half = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        max_sq = 0.0
        for start in range(0, n, 65536):  # bounded temporary memory
            chunk = np.ascontiguousarray(self._vectors[start : start + 65536])
            self._half.add(chunk)
            max_sq = max(max_sq, float(np.einsum("ij,ij->i", chunk, chunk).max()))
        self._max_norm = math.sqrt(max_sq)

    @classmethod
    def worthwhile(cls, index: faiss.Index, kind: str, mmap: bool) -> bool:
        """Flat, in memory (a mapped index is kept out of RAM on purpose) and big enough to gain."""
        return kind == "flat" and not mmap and index.ntotal >= cls.MIN_VECTORS

    @classmethod
    def for_index(cls, index: faiss.Index, kind: str, mmap: bool) -> HalfPrecisionScan | None:
        """The scan for a snapshot's index, or None where it would not pay."""
        return cls(index) if cls.worthwhile(index, kind, mmap) else None

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the exact top k for one query row, shaped (1, k)."""
        n = len(self._ids)
        k = min(k, n)
        q_norm = float(np.linalg.norm(query))
        # float16 rounding (relative 2^-11, subnormals absolute 2^-25) plus float32 summation slack
        eps = q_norm * (self._max_norm * 2.0**-11 + math.sqrt(query.shape[1]) * 2.0**-25) + 1e-6
        want = min(n, max(4 * k, k + 32))
        while True:
            scores, pos = self._half.search(query, want)
            if want >= n or scores[0, want - 1] < scores[0, k - 1] - 2 * eps:
                break
            want = min(n, want * 4)
        candidates = pos[0][pos[0] >= 0]
        exact = self._vectors[candidates] @ query[0]
        best = np.argsort(-exact, kind="stable")[:k]
        return exact[best][None, :].astype(np.float32), self._ids[candidates[best]][None, :]


IVFPQ_MIN_VECTORS = 1000
QUANTIZER_M = 32  # the graph over the IVF centroids: its degree, and a candidate list wider than nprobe
QUANTIZER_EF = 128  # (default 16) so the nearest lists are the ones found
QUANTIZER_EF_SEARCH = 32  # its query-time candidate list, or nprobe when larger (docs/benchmarks.md)
FAST_SCAN_IMPLEM = 11  # IndexIVFFastScan's kernel choice for searches (tune_for_queries)
SQ_MIN_VECTORS = 1000  # the 8-bit quantizer learns each component's range from a sample
REFINED = ("ivfpq", "hnswsq")  # kinds whose id map wraps an IndexRefine (selectors see internal positions)


def ivfpq_trainable(count: int, params: IndexParams) -> bool:
    """Enough vectors to train the coarse quantizer and the PQ codebooks without degenerate clusters."""
    return count >= max(IVFPQ_MIN_VECTORS, 1 << (params.pq_nbits or 8), 39 * (params.nlist or 0))


_RANK = {"flat": 0, "hnsw": 1, "hnswsq": 1, "ivfpq": 2}  # an existing hnsw index is not re-indexed sideways


def fitting_type(requested: str, count: int, params: IndexParams) -> str:
    """The type `requested` means for `count` vectors.

    An explicit ivfpq or hnswsq index stays exact (flat) until it holds enough vectors to train
    on; auto takes the full-precision graph there instead (only when FLAT_MAX is set that low).
    """
    wanted = choose_type(requested, count)
    if wanted == "ivfpq" and not ivfpq_trainable(count, params):
        wanted = "flat" if requested == "ivfpq" else "hnswsq"
    if wanted == "hnswsq" and count < SQ_MIN_VECTORS:
        wanted = "flat" if requested == "hnswsq" else "hnsw"
    return wanted


def target_type(requested: str, current: str, count: int, params: IndexParams) -> str:
    """The type an index of `count` vectors should have now; types are only ever promoted."""
    wanted = fitting_type(requested, count, params)
    return wanted if _RANK[wanted] > _RANK[current] else current
