"""A mapped index gives back the file pages its reading touched, and searches as before."""

import mmap
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from index_helpers import clustered, images

from index import ImageIndex, backends
from index.mapped_pages import (
    RowPrefetch,
    release_touched_pages,
    shared_read_only_mappings,
)
from index.snapshot import read_faiss

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")

N, DIM = 20_000, 64


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    starts, total, inside = {start for start, _ in shared_read_only_mappings(path)}, 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = int(head[0].split("-")[0], 16) in starts
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.fixture
def index_file(tmp_path) -> Path:
    """An id-mapped flat index: reading it mapped copies its 160 KB id map out of the file."""
    rng = np.random.default_rng(0)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(rng.standard_normal((N, DIM)).astype(np.float32), np.arange(N, dtype=np.int64) * 7)
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))
    return path


def test_reading_touches_the_file_pages_it_copies_from(index_file):
    index = faiss.read_index(str(index_file), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    assert index.ntotal == N and _resident_kib(index_file) >= N * 8 // 1024  # the ids, at least


def test_a_mapped_read_leaves_none_of_the_file_resident_and_searches_alike(index_file):
    mapped = read_faiss(index_file, mmap=True)
    assert shared_read_only_mappings(index_file) and _resident_kib(index_file) == 0
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    in_memory = read_faiss(index_file, mmap=False)
    assert np.array_equal(mapped.search(queries, 10)[1], in_memory.search(queries, 10)[1])
    assert _resident_kib(index_file) > 0  # the scan faulted the vectors back in from the page cache


def test_a_file_read_into_memory_has_no_mapping_to_release(index_file):
    index = read_faiss(index_file, mmap=False)
    assert index.ntotal == N and shared_read_only_mappings(index_file) == []
    assert release_touched_pages(index_file) == 0


def test_mappings_are_found_through_another_name_for_the_file(index_file, tmp_path):
    link = tmp_path / "link.faiss"
    link.symlink_to(index_file)
    index = read_faiss(link, mmap=True)
    assert index.ntotal == N and len(shared_read_only_mappings(link)) >= 1
    assert _resident_kib(index_file) == 0


def _in_core(start: int, pages: int) -> np.ndarray:
    """Which of `pages` pages from the page-aligned address `start` are in the page cache (mincore)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(start, pages * mmap.PAGESIZE, vec) == 0, ctypes.get_errno()
    return np.frombuffer(vec, np.uint8) & 1 == 1


def _mapped_ivfpq_file(tmp_path: Path, n: int = 6000, dim: int = 128) -> tuple[Path, np.ndarray]:
    vectors = clustered(n, dim, seed=3)
    index, _ = backends.new_index("ivfpq", dim, backends.parse_params({"nlist": 32, "refine_k_factor": 8}), vectors)
    backends.add(index, vectors, np.arange(n, dtype=np.int64) * 5)
    path = tmp_path / "ivfpq.faiss"
    faiss.write_index(index, str(path))
    return path, vectors


def test_the_hint_brings_the_candidates_rows_into_the_page_cache(tmp_path):
    path, vectors = _mapped_ivfpq_file(tmp_path)
    index = read_faiss(path, mmap=True)
    prefetch = RowPrefetch.for_index(index, mapped=True)
    assert prefetch is not None and prefetch.row_bytes == 128 * 2 and prefetch.rows == 6000
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # dirty pages stay cached
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    page = mmap.PAGESIZE
    first = prefetch.address // page * page
    pages = (prefetch.address + prefetch.rows * prefetch.row_bytes - first + page - 1) // page
    if _in_core(first, pages).mean() > 0.5:
        pytest.skip("this file system keeps the file in memory (tmpfs): nothing to read ahead")
    query = vectors[7:8]
    _, positions = prefetch.base.search(query, 80, params=backends.ivf_search_params(24))
    wanted = np.unique((prefetch.address + positions[positions >= 0] * prefetch.row_bytes - first) // page)
    assert not _in_core(first, pages)[wanted].all()
    prefetch(query, 80, backends.ivf_search_params(24))
    deadline = time.monotonic() + 5
    while not _in_core(first, pages)[wanted].all() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _in_core(first, pages)[wanted].all()


def test_only_a_mapped_refined_index_reads_ahead_and_it_answers_as_without(tmp_path):
    path, vectors = _mapped_ivfpq_file(tmp_path)
    mapped, in_memory = read_faiss(path, mmap=True), read_faiss(path, mmap=False)
    prefetch = RowPrefetch.for_index(mapped, mapped=True)
    assert prefetch is not None
    assert RowPrefetch.for_index(in_memory, mapped=True) is None  # owns its rows
    for name, unrefined in (("flat", faiss.IndexIDMap2(faiss.IndexFlatIP(128))),
                            ("codes", backends.new_index("ivfpq", 128, backends.parse_params(
                                {"nlist": 32, "refine_k_factor": 0}), vectors)[0])):
        backends.add(unrefined, vectors, np.arange(len(vectors), dtype=np.int64))
        faiss.write_index(unrefined, str(tmp_path / f"{name}.faiss"))
        assert RowPrefetch.for_index(read_faiss(tmp_path / f"{name}.faiss", mmap=True), mapped=True) is None
    tombstones = backends.Tombstones(np.arange(0, 6000 * 5, 15, dtype=np.int64), mapped, "ivfpq")
    queries = vectors[:50]
    params = {"refine_k_factor": 8, "nprobe": 16}
    hinted = backends.search(mapped, "ivfpq", queries, 10, params, tombstones, prefetch=prefetch)
    plain = backends.search(in_memory, "ivfpq", queries, 10, params,
                            backends.Tombstones(np.arange(0, 6000 * 5, 15, dtype=np.int64), in_memory, "ivfpq"))
    assert np.array_equal(hinted[1], plain[1]) and np.allclose(hinted[0], plain[0])
    assert not np.isin(hinted[1], np.arange(0, 6000 * 5, 15)).any()


def test_an_image_index_opened_mapped_reads_ahead_and_finds_the_same(tmp_path):
    vecs = clustered(1500, 32)
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=32, index_type="ivfpq",
                            params={"nlist": 16, "nprobe": 16, "refine_k_factor": 8})
    idx.add_embeddings(vecs, images(1500))
    idx.remove([h[0].id for h in idx.search_by_vector(vecs[:5], k=1)])
    mapped = ImageIndex.open(tmp_path / "idx", mmap=True)
    assert mapped._state.prefetch is not None and ImageIndex.open(tmp_path / "idx")._state.prefetch is None
    assert mapped.search_by_vector(vecs[:30], k=10) == idx.search_by_vector(vecs[:30], k=10)


def test_a_mapped_hnswsq_index_reads_ahead_too_and_answers_as_without(tmp_path):
    vectors = clustered(3000, 64, seed=5)
    index, resolved = backends.new_index("hnswsq", 64, backends.parse_params({"refine_k_factor": 4}), vectors)
    backends.add(index, vectors, np.arange(3000, dtype=np.int64) * 2)
    path = tmp_path / "hnswsq.faiss"
    faiss.write_index(index, str(path))
    mapped, in_memory = read_faiss(path, mmap=True), read_faiss(path, mmap=False)
    prefetch = RowPrefetch.for_index(mapped, mapped=True)
    assert prefetch is not None and prefetch.row_bytes == 64 * 2
    hinted = backends.search(mapped, "hnswsq", vectors[:40], 10, resolved, None, prefetch=prefetch)
    plain = backends.search(in_memory, "hnswsq", vectors[:40], 10, resolved, None)
    assert np.array_equal(hinted[1], plain[1]) and (hinted[1][:, 0] == np.arange(40) * 2).mean() > 0.9
