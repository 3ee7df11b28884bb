"""The delta segment (index/segments.py): small writes to a large index leave its main FAISS file alone,
and every read (search, filtered search, verify, reopen, rebuild) sees one index over both parts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from index import ImageIndex, NewImage, segments
from index.errors import IndexStoreError
from index.search_filter import SearchFilter

DIM = 16


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments from 50 vectors, the delta up to half the main index: the 1M code paths at test size."""
    monkeypatch.setattr(segments, "SEGMENT_FROM", 50)
    monkeypatch.setattr(segments, "DELTA_SHARE", 0.5)


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def images(start: int, n: int, folder: str = "a") -> list[NewImage]:
    return [NewImage(f"{folder}/{i}.png", f"{i}".rjust(64, "h"), 10 + i, 10, f"cap {i}") for i in range(start, start + n)]


def main_inode(idx: ImageIndex) -> int:
    return os.stat(idx.directory / f"gen-{idx.generation:08d}" / "index.faiss").st_ino


class Model:
    """The index's expected content: every live vector with its id, and the exact top k over them."""

    def __init__(self) -> None:
        self.vectors: dict[int, np.ndarray] = {}

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        self.vectors.update(zip(ids, vectors))

    def remove(self, ids: list[int]) -> None:
        for i in ids:
            del self.vectors[i]

    def top(self, queries: np.ndarray, k: int, keep: set[int] | None = None) -> list[list[int]]:
        ids = np.array([i for i in self.vectors if keep is None or i in keep])
        mat = np.stack([self.vectors[i] for i in ids])
        return [ids[np.argsort(-row, kind="stable")[:k]].tolist() for row in queries @ mat.T]


def found(idx: ImageIndex, queries: np.ndarray, k: int = 10, **kw: object) -> list[list[int]]:
    return [[r.id for r in row] for row in idx.search_by_vector(queries, k, **kw)]


def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    return float(np.mean([len(set(x) & set(y)) / max(len(x), 1) for x, y in zip(a, b)]))


def add(idx: ImageIndex, model: Model, vecs: np.ndarray, new: list[NewImage]) -> tuple[list[int], np.ndarray]:
    """Add to the index and to the model; the new ids and the vectors."""
    added = idx.add_embeddings(vecs, new).added
    model.add(added, vecs)
    return added, vecs


def remove(idx: ImageIndex, model: Model, ids: list[int]) -> int:
    model.remove(ids)
    return idx.remove(ids)


def built(tmp_path: Path, kind: str, base: int = 100) -> tuple[ImageIndex, Model]:
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=DIM, index_type=kind)
    model = Model()
    add(idx, model, unit(base, 0), images(0, base))
    assert idx.info()["delta_count"] == 0  # the first write to an empty index builds the main index
    return idx, model


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_an_add_to_a_large_index_writes_only_the_delta(tmp_path: Path, kind: str) -> None:
    idx, model = built(tmp_path, kind)
    inode = main_inode(idx)
    for round_ in range(3):
        add(idx, model, unit(10, 10 + round_), images(200 + 10 * round_, 10))
        assert main_inode(idx) == inode  # shared by a hard link, not rewritten
    info = idx.info()
    assert info["delta_count"] == 30 and info["faiss_ntotal"] == 130 and idx.verify()["count"] == 130
    queries = np.concatenate([unit(5, 99), unit(10, 12)])  # the last rows are delta vectors themselves
    got = found(idx, queries)
    assert got == model.top(queries, 10) if kind == "flat" else overlap(got, model.top(queries, 10)) >= 0.95
    assert [row[0] for row in got[5:]] == sorted(model.vectors)[-10:]  # each delta vector is its own best hit


def test_removals_in_both_parts_of_a_graph_index_are_tombstones(tmp_path: Path) -> None:
    idx, model = built(tmp_path, "hnsw")
    added, vecs = add(idx, model, unit(20, 5), images(200, 20))
    inode = main_inode(idx)
    gone = [3, 40, added[0], added[7]]
    assert remove(idx, model, gone) == 4
    assert main_inode(idx) == inode
    info = idx.info()
    assert info["tombstones"] == 4 and info["delta_count"] == 20 and idx.verify()["count"] == 116
    queries = np.concatenate([unit(5, 98), vecs[[0, 7]]])
    got = found(idx, queries)
    assert not set(gone) & {i for row in got for i in row}
    assert overlap(got, model.top(queries, 10)) >= 0.95


def test_a_flat_delta_removes_physically_and_a_main_removal_folds_the_delta_in(tmp_path: Path) -> None:
    idx, model = built(tmp_path, "flat")
    added, _ = add(idx, model, unit(20, 5), images(200, 20))
    inode = main_inode(idx)
    remove(idx, model, added[:5])
    assert main_inode(idx) == inode and idx.info()["delta_count"] == 15 and idx.info()["tombstones"] == 0
    remove(idx, model, [7])  # flat deletes physically: the main index is rewritten, and takes the delta with it
    assert main_inode(idx) != inode and idx.info()["delta_count"] == 0 and idx.info()["faiss_ntotal"] == 114
    queries = unit(6, 77)
    assert found(idx, queries) == model.top(queries, 10)
    idx.verify()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_the_delta_is_folded_in_past_its_capacity(tmp_path: Path, kind: str) -> None:
    idx, model = built(tmp_path, kind)  # capacity: half of 100
    added, _ = add(idx, model, unit(40, 6), images(200, 40))
    if kind == "hnsw":
        remove(idx, model, added[:3])  # tombstones in the delta vanish with it when it is folded
    inode = main_inode(idx)
    add(idx, model, unit(20, 7), images(300, 20))
    info = idx.info()
    assert main_inode(idx) != inode and info["delta_count"] == 0 and info["tombstones"] == 0
    assert info["faiss_ntotal"] == len(model.vectors) == idx.verify()["count"]
    queries = unit(6, 55)
    got = found(idx, queries)
    assert got == model.top(queries, 10) if kind == "flat" else overlap(got, model.top(queries, 10)) >= 0.95


@pytest.mark.parametrize("mmap", [False, True])
def test_a_reopened_index_reads_its_delta(tmp_path: Path, mmap: bool) -> None:
    idx, model = built(tmp_path, "hnsw")
    added, vecs = add(idx, model, unit(15, 8), images(200, 15))
    remove(idx, model, [added[2], 9])
    queries = np.concatenate([unit(4, 3), vecs[[2, 3]]])
    before = found(idx, queries)
    idx.close()
    with ImageIndex.open(tmp_path / "idx", mmap=mmap) as again:
        assert again.info()["delta_count"] == 15 and again.verify()["count"] == 113
        assert found(again, queries) == before
        vecs2 = unit(5, 9)  # a write through a mapped index edits a private copy of its delta
        again.add_embeddings(vecs2, images(300, 5))
        assert again.info()["delta_count"] == 20 and again.verify()["count"] == 118


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_filtered_search_is_exact_across_both_parts(tmp_path: Path, kind: str) -> None:
    idx, model = built(tmp_path, kind)
    added, _ = add(idx, model, unit(30, 4), images(200, 30, folder="b"))
    queries = unit(5, 66)
    records = {r.id: r for r in idx.records(0, 1000)}
    cases = [
        (SearchFilter(path_prefix="b/"), lambda r: r.path.startswith("b/")),  # only delta images
        (SearchFilter(min_width=60), lambda r: r.width >= 60),  # some in each part
        (SearchFilter(caption_contains="cap 2"), lambda r: "cap 2" in r.caption),
    ]
    for conditions, passes in cases:
        keep = {i for i, r in records.items() if passes(r)}
        assert keep & set(added)
        assert found(idx, queries, filter=conditions) == model.top(queries, 10, keep=keep)


def test_rebuild_folds_the_delta_and_keeps_every_image(tmp_path: Path) -> None:
    idx, model = built(tmp_path, "hnsw")
    added, _ = add(idx, model, unit(20, 4), images(200, 20))
    remove(idx, model, [added[1], 2])
    idx.rebuild(index_type="flat")
    info = idx.info()
    assert info["index_type"] == "flat" and info["delta_count"] == 0 and info["tombstones"] == 0
    assert info["faiss_ntotal"] == 118 == idx.verify()["count"]
    queries = unit(5, 1)
    assert found(idx, queries) == model.top(queries, 10)


def test_merge_top_keeps_the_best_k_and_puts_missing_results_last() -> None:
    first = (np.array([[0.9, 0.5, -3e38]], np.float32), np.array([[1, 2, -1]]))
    second = (np.array([[0.7, 0.1]], np.float32), np.array([[7, 8]]))
    scores, ids = segments.merge_top(first, second, 4)
    assert ids.tolist() == [[1, 7, 2, 8]] and np.allclose(scores, [[0.9, 0.7, 0.5, 0.1]])
    _, ids = segments.merge_top((np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64)), second, 3)
    assert ids.tolist() == [[7, 8]]


def test_small_indexes_have_no_delta(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(segments, "SEGMENT_FROM", 20_000)
    idx, _ = built(tmp_path, "flat")
    idx.add_embeddings(unit(5, 3), images(200, 5))
    assert idx.info()["delta_count"] == 0 and segments.delta_capacity(19_999) == 0
    monkeypatch.setattr(segments, "DELTA_SHARE", 0.05)
    assert segments.delta_capacity(1_000_000) == 50_000 and segments.delta_capacity(10_000_000) == segments.DELTA_MAX


def test_a_codes_only_ivfpq_index_tombstones_removals_in_its_graph_delta(tmp_path: Path) -> None:
    """The main index deletes physically, its HNSW delta cannot: removing recent images must still work."""
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=DIM, index_type="ivfpq",
                            params={"nlist": 8, "refine_k_factor": 0})
    idx.add_embeddings(unit(1200, 0), images(0, 1200))
    assert idx.index_type == "ivfpq"
    added = idx.add_embeddings(unit(30, 1), images(2000, 30)).added
    assert idx.remove(added[:5]) == 5
    info = idx.info()
    assert info["delta_count"] == 30 and info["tombstones"] == 5 and idx.verify()["count"] == 1225
    assert not set(added[:5]) & {i for row in found(idx, unit(30, 1)) for i in row}


def test_a_generation_whose_delta_file_is_missing_is_refused(tmp_path: Path) -> None:
    """The manifest records the delta, so a reader that loses the race with a writer's clean-up retries
    rather than serving the main index alone."""
    idx, _ = built(tmp_path, "hnsw")
    idx.add_embeddings(unit(10, 1), images(200, 10))
    delta = idx.directory / f"gen-{idx.generation:08d}" / segments.DELTA_FILE
    idx.close()
    delta.unlink()
    with pytest.raises(IndexStoreError, match="incomplete"):
        ImageIndex.open(tmp_path / "idx")


def test_a_write_carries_loaded_filter_columns_forward(tmp_path: Path) -> None:
    """After a filtered search, a write derives the next generation's columns (no reload of every row), and
    they answer as the columns a fresh open loads from the metadata."""
    idx, _ = built(tmp_path, "hnsw")
    conditions = [SearchFilter(path_prefix="b/"), SearchFilter(min_width=60), SearchFilter(caption_contains="cap 2"),
                  SearchFilter(added_after="2000-01-01"), SearchFilter(caption_contains="é")]
    queries = unit(4, 21)
    idx.search_by_vector(queries, 5, filter=conditions[0])  # loads the columns
    vecs = unit(30, 4)
    extra = [NewImage(f"b/{i}.png", f"{i}".rjust(64, "q"), 10 + i, 10, f"cap {i} é" if i % 2 else None)
             for i in range(300, 330)]
    added = idx.add_embeddings(vecs, extra).added
    idx.remove([added[3], 5, 17])
    assert idx._state.columns._loaded  # derived by the writer, not waiting for a reload
    derived = [found(idx, queries, 10, filter=c) for c in conditions]
    with ImageIndex.open(tmp_path / "idx") as fresh:
        assert not fresh._state.columns._loaded
        assert [found(fresh, queries, 10, filter=c) for c in conditions] == derived
    assert any(set(row) & set(added) for rows in derived for row in rows)
