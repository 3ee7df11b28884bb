"""The hnswsq type: HNSW over 8-bit codes with exact float16 re-scoring, through ImageIndex and the auto choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from index_helpers import (
    clustered,
    exact_top,
    images,
    recall,
    remove_top_hits_and_reopen,
)

from index import ImageIndex, backends


def test_auto_picks_hnswsq_past_the_exact_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "FLAT_MAX", 1500)
    assert backends.choose_type("auto", 1500) == "flat"
    assert backends.choose_type("auto", 1501) == "hnswsq"
    assert backends.fitting_type("hnswsq", backends.SQ_MIN_VECTORS - 1, backends.IndexParams()) == "flat"


@pytest.mark.parametrize("mmap", [False, True])
def test_hnswsq_recall_removal_and_reopen(tmp_path: Path, mmap: bool) -> None:
    x = clustered(3000)
    idx = ImageIndex.create(tmp_path / "i", "m", dim=32, index_type="hnswsq", root=tmp_path)
    idx.add_embeddings(x[:500], images(500))
    assert idx.index_type == "flat"  # too few vectors to train the quantizer yet
    idx.add_embeddings(x[500:], images(2500, start=500))
    assert idx.index_type == "hnswsq" and len(idx) == 3000
    q = clustered(50, seed=1)
    ids = np.arange(1, 3001)
    truth = exact_top(x, q, 10, ids)
    hits = idx.search_by_vector(q, 10)
    assert recall(hits, truth) >= 0.95
    # re-scored scores are the exact cosines (float16 copies), not the 8-bit approximations
    top = hits[0][0]
    assert top.score == pytest.approx(float(x[top.id - 1] @ q[0]), abs=2e-3)
    reopened = remove_top_hits_and_reopen(idx, q, hits, mmap=mmap)
    reopened.rebuild()
    assert reopened.index_type == "hnswsq" and reopened.verify()["tombstones"] == 0 and len(reopened) == 2995
