"""The float16 first pass of single-query exact search returns exactly the float32 answer."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index import backends
from index.backends import HalfPrecisionScan, IndexParams


def _flat(vectors: np.ndarray, ids: np.ndarray | None = None) -> faiss.Index:
    index, _ = backends.new_index("flat", vectors.shape[1], IndexParams())
    backends.add(index, vectors, np.arange(len(vectors), dtype=np.int64) * 7 + 3 if ids is None else ids)
    return index


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _plain(index: faiss.Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return backends.search(index, "flat", query, k, {})


@pytest.mark.parametrize("k", [1, 10, 100])
def test_same_ids_and_scores_as_the_float32_scan(k: int) -> None:
    index = _flat(_unit(30_000, 64, 0))
    half = HalfPrecisionScan(index)
    for query in _unit(20, 64, 1):
        scores, ids = half.search(query[None, :], k)
        ref_scores, ref_ids = _plain(index, query[None, :], k)
        assert np.array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)


def test_exact_where_float16_alone_ranks_wrongly() -> None:
    """Many vectors whose scores differ by less than float16 can resolve: the re-scoring orders them."""
    rng = np.random.default_rng(2)
    base = _unit(1, 32, 3)[0]
    near = base + rng.standard_normal((4000, 32)).astype(np.float32) * 1e-4  # scores within ~1e-4 of each other
    vectors = np.vstack([near, _unit(26_000, 32, 4)]).astype(np.float32)
    index = _flat(vectors)
    half = HalfPrecisionScan(index)
    fp16_only = faiss.IndexScalarQuantizer(32, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    fp16_only.add(vectors)
    query = base[None, :]
    _, rough = fp16_only.search(query, 10)
    exact_order = np.argsort(-(vectors @ base), kind="stable")[:10]
    assert not np.array_equal(rough[0], exact_order)  # the case is a real one: float16 alone gets it wrong
    scores, ids = half.search(query, 10)
    assert np.array_equal(ids[0], exact_order * 7 + 3)
    assert np.all(np.diff(scores[0]) <= 0)


def test_k_larger_than_the_collection_and_unnormalised_query() -> None:
    index = _flat(_unit(20_000, 16, 5))
    half = HalfPrecisionScan(index)
    query = _unit(1, 16, 6) * 3.0
    scores, ids = half.search(query, 50_000)
    assert ids.shape == (1, 20_000) and len(set(ids[0].tolist())) == 20_000
    ref_scores, _ = _plain(index, query, 20_000)
    np.testing.assert_allclose(scores[0], ref_scores[0], atol=1e-5)


def test_used_only_for_big_in_memory_flat_indexes() -> None:
    big = _flat(_unit(HalfPrecisionScan.MIN_VECTORS, 8, 7))
    assert HalfPrecisionScan.worthwhile(big, "flat", mmap=False)
    assert not HalfPrecisionScan.worthwhile(big, "flat", mmap=True)
    assert not HalfPrecisionScan.worthwhile(_flat(_unit(100, 8, 8)), "flat", mmap=False)
    assert not HalfPrecisionScan.worthwhile(big, "hnsw", mmap=False)
