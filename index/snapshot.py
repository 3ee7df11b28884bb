"""One committed generation as readers see it: loaded from disk once, then searched and checked without locks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import backends, store
from .backends import Tombstones
from .errors import IndexStoreError
from .files import removal_targets
from .filter_columns import FilterColumns
from .filtered import StoredVectors, search_filtered
from .manifest import Manifest
from .mapped_pages import RowPrefetch, release_touched_pages
from .metadata import ImageRecord, MetadataReader
from .search_filter import SearchFilter
from .segments import DELTA_FILE, delta_kind, merge_top
from .types import SearchResult


@dataclass(frozen=True)
class Snapshot:
    """Everything a search needs, swapped as one attribute so a reader never sees half an update."""

    generation: int
    manifest: Manifest
    index: faiss.Index
    db: MetadataReader
    tombstones: Tombstones
    mmap: bool
    half_scan: backends.HalfPrecisionScan | None = None
    stored: StoredVectors | None = None
    columns: FilterColumns | None = None
    delta: faiss.Index | None = None  # the delta segment (segments.py): recent additions beside `index`
    delta_tombstones: Tombstones | None = None
    delta_stored: StoredVectors | None = None
    prefetch: RowPrefetch | None = None  # a mapped re-ranked main index's candidate rows, read ahead

    @property
    def delta_kind(self) -> str:
        return delta_kind(self.manifest.index_type)

    @property
    def ntotal(self) -> int:
        """Vectors stored in both parts, tombstoned ones included."""
        return int(self.index.ntotal) + (int(self.delta.ntotal) if self.delta is not None else 0)

    @classmethod
    def assemble(
        cls, *, generation: int, manifest: Manifest, index: faiss.Index, db: MetadataReader,
        tombstone_ids: np.ndarray, mmap: bool, delta: faiss.Index | None = None, same_main_as: Snapshot | None = None,
        columns: FilterColumns | None = None,
    ) -> Snapshot:
        """A snapshot with the tombstone selectors and half-precision scan its parts call for.

        same_main_as: an earlier snapshot whose main index object this one keeps, so its
        position tables and float16 scan are reused rather than rebuilt on every small write;
        columns: the filter columns when the writer derived them (else loaded on first use).
        """
        kind = manifest.index_type
        tombstones = Tombstones(tombstone_ids, index, kind)
        if same_main_as is not None and same_main_as.index is index:
            half_scan, stored, prefetch = same_main_as.half_scan, same_main_as.stored, same_main_as.prefetch
        else:
            backends.tune_for_queries(index)
            half_scan, stored = backends.HalfPrecisionScan.for_index(index, kind, mmap), StoredVectors(index, kind)
            prefetch = RowPrefetch.for_index(index, mapped=mmap)
        delta_parts: tuple = (None, None, None)
        if delta is not None and delta.ntotal:
            dkind = delta_kind(kind)
            delta_parts = (delta, Tombstones(tombstone_ids, delta, dkind), StoredVectors(delta, dkind))
        return cls(generation, manifest, index, db, tombstones, mmap, half_scan, stored, columns or FilterColumns(db),
                   *delta_parts, prefetch=prefetch)


def normalise_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Rows of `vectors` as unit float32 vectors, refusing a wrong shape or non-finite values.

    At most one new array of the input's size: a float32 copy made here is scaled in place, and the
    norms are taken a block of rows at a time (a million 512-d rows would otherwise cost 4 GB more).
    """
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise IndexStoreError(f"expected vectors of shape (n, {dim}), got {tuple(np.shape(vectors))}")
    if not np.isfinite(arr).all():
        raise IndexStoreError("vectors contain NaN or infinite values")
    norms = np.empty((len(arr), 1), np.float32)
    for start in range(0, len(arr), _NORM_ROWS):
        norms[start : start + _NORM_ROWS] = np.linalg.norm(arr[start : start + _NORM_ROWS], axis=1, keepdims=True)
    converted = not isinstance(vectors, np.ndarray) or not np.may_share_memory(arr, vectors)
    out = arr if converted and arr.flags.c_contiguous and arr.flags.writeable else np.empty(arr.shape, np.float32)
    return np.divide(arr, np.maximum(norms, 1e-12), out=out)


_NORM_ROWS = 4096  # rows whose squares numpy holds at once while taking norms


def read_faiss(path: Path, mmap: bool) -> faiss.Index:
    # Full-size vector storage (flat, HNSW storage, IVF-PQ float16 re-rank copies) is mapped; PQ codes are read.
    flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise IndexStoreError(f"cannot read FAISS index {path}: {str(exc).splitlines()[0]}") from exc
    if mmap:
        release_touched_pages(path)
    return index


def load_snapshot(directory: Path, mmap: bool) -> Snapshot:
    """The live generation; retried when a writer in another process retires it while we read."""
    last: Exception | None = None
    for _ in range(5):
        generation = store.read_current(directory)
        gen_dir = directory / store.gen_name(generation)
        try:
            manifest = Manifest.from_file(gen_dir / store.MANIFEST_FILE)
            if not (gen_dir / store.DB_FILE).is_file() or not (gen_dir / store.FAISS_FILE).is_file():
                raise IndexStoreError(f"{gen_dir} is incomplete")
            db = MetadataReader(gen_dir / store.DB_FILE)
            index = read_faiss(gen_dir / store.FAISS_FILE, mmap)
            delta = None
            if manifest.delta_count:  # a missing file is a generation retired under us (retried) or damage
                if not (gen_dir / DELTA_FILE).is_file():
                    raise IndexStoreError(f"{gen_dir} is incomplete (no {DELTA_FILE})")
                delta = read_faiss(gen_dir / DELTA_FILE, mmap)
        except IndexStoreError as exc:
            if store.read_current(directory) != generation:
                last = exc
                continue  # replaced under us: read the new pointer
            raise
        if index.d != manifest.dim or (delta is not None and (delta.d != manifest.dim or delta.ntotal != manifest.delta_count)):
            raise IndexStoreError(f"{gen_dir}: its FAISS files do not match the manifest (dimension {manifest.dim}, "
                                  f"{manifest.delta_count} delta vectors)")
        tombstone_ids = np.array(db.tombstones() if manifest.tombstones else [], dtype=np.int64)
        return Snapshot.assemble(
            generation=generation, manifest=manifest, index=index, db=db, tombstone_ids=tombstone_ids, mmap=mmap,
            delta=delta,
        )
    raise IndexStoreError(f"{directory} keeps changing while being opened: {last}")


def search_snapshot(
    snapshot: Snapshot, vectors: np.ndarray, k: int, *, min_score: float | None = None,
    ef_search: int | None = None, nprobe: int | None = None, conditions: SearchFilter | None = None,
) -> list[list[SearchResult]]:
    """The k most similar images for each query vector (rows of `vectors`), best first; with
    `conditions`, the k most similar among the images that pass them."""
    m = snapshot.manifest
    queries = normalise_vectors(vectors, m.dim)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexStoreError(f"k must be a positive integer, got {k!r}")
    if m.count == 0:
        return [[] for _ in range(len(queries))]
    allowed = None
    if conditions is not None and not conditions.empty:
        allowed = snapshot.columns.matching(conditions)  # removed images are gone from the metadata
        if len(allowed) == m.count:
            allowed = None  # everything passes: the unfiltered search is the same answer, faster
    if allowed is not None:
        scores, ids = _filtered_parts(snapshot, queries, int(k), allowed, ef_search=ef_search, nprobe=nprobe)
    else:
        k_searched = int(min(k, snapshot.index.ntotal))
        scores, ids = backends.search(
            snapshot.index, m.index_type, queries, k_searched, m.params, snapshot.tombstones, ef_search, nprobe,
            snapshot.half_scan, snapshot.prefetch,
        )
        if snapshot.delta is not None:
            recent = backends.search(
                snapshot.delta, snapshot.delta_kind, queries, int(min(k, snapshot.delta.ntotal)), m.params,
                snapshot.delta_tombstones, ef_search, nprobe,
            )
            scores, ids = merge_top((scores, ids), recent, int(k))
    fields = snapshot.db.result_fields([i for i in ids.ravel().tolist() if i >= 0])
    out: list[list[SearchResult]] = []
    for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
        hits = []
        for score, image_id in zip(row_scores, row_ids):
            found = fields.get(image_id)
            if found is None or (min_score is not None and score < min_score):
                continue
            hits.append(SearchResult(image_id, score, *found))
        out.append(hits[:k])
    return out


def _filtered_parts(
    snapshot: Snapshot, queries: np.ndarray, k: int, allowed: np.ndarray, *, ef_search: int | None,
    nprobe: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The filtered search in the main index and the delta, each over the passing ids it holds, merged."""
    params = snapshot.manifest.params
    if snapshot.delta is None:
        return search_filtered(stored=snapshot.stored, queries=queries, k=k, allowed=allowed, params=params,
                               ef_search=ef_search, nprobe=nprobe)
    recent = snapshot.delta_stored.held(allowed)
    main = search_filtered(stored=snapshot.stored, queries=queries, k=k, allowed=np.setdiff1d(allowed, recent),
                           params=params, ef_search=ef_search, nprobe=nprobe)
    extra = search_filtered(stored=snapshot.delta_stored, queries=queries, k=k, allowed=recent, params=params,
                            ef_search=ef_search, nprobe=nprobe)
    return merge_top(main, extra, k)


def stored_ids(snapshot: Snapshot) -> np.ndarray:
    """Every id the FAISS parts hold, tombstoned ones included (main index first)."""
    kind = snapshot.manifest.index_type
    main = backends.stored_ids(snapshot.index, kind)
    if snapshot.delta is None:
        return main
    return np.concatenate([main, backends.stored_ids(snapshot.delta, snapshot.delta_kind)])


def verify_snapshot(snapshot: Snapshot, directory: Path) -> dict[str, int]:
    """Check that FAISS, SQLite and the manifest agree; raises IndexStoreError when they do not."""
    m = snapshot.manifest
    faiss_ids = stored_ids(snapshot)
    live = np.setdiff1d(faiss_ids, snapshot.tombstones.ids)
    db_ids = np.array(snapshot.db.all_ids(), dtype=np.int64)
    problems = []
    if len(faiss_ids) != len(np.unique(faiss_ids)):
        problems.append("duplicate ids in FAISS")
    if not np.array_equal(np.sort(live), db_ids):
        problems.append(f"FAISS holds {len(live)} live ids, SQLite {len(db_ids)} rows, and they differ")
    if m.count != len(db_ids):
        problems.append(f"manifest count {m.count} != {len(db_ids)} rows")
    if m.tombstones != len(snapshot.tombstones):
        problems.append(f"manifest tombstones {m.tombstones} != {len(snapshot.tombstones)}")
    if len(db_ids) and db_ids.max() >= m.next_id:
        problems.append("an id is not below next_id")
    if problems:
        raise IndexStoreError(f"index {directory} is inconsistent: " + "; ".join(problems))
    return {"count": len(db_ids), "faiss_ntotal": snapshot.ntotal, "tombstones": len(snapshot.tombstones)}


def describe_snapshot(snapshot: Snapshot, *, directory: Path, root: Path, uploads_dir: Path) -> dict[str, Any]:
    """What `clipforge index info` and the service's info endpoint show."""
    m = snapshot.manifest
    try:
        size = sum(f.stat().st_size for f in (directory / store.gen_name(snapshot.generation)).iterdir())
    except FileNotFoundError:  # retired by a writer in another process since we loaded it
        size = 0
    return {
        "path": str(directory), "count": m.count, "index_type": m.index_type, "requested_type": m.requested_type,
        "params": dict(m.params), "dim": m.dim, "metric": m.metric, "checkpoint_hash": m.model_id,
        "checkpoint_path": m.checkpoint_path, "root": str(root), "uploads": str(uploads_dir),
        "tombstones": m.tombstones, "next_id": m.next_id, "generation": snapshot.generation,
        "created": m.created, "updated": m.updated, "size_bytes": size, "mmap": snapshot.mmap,
        "faiss_ntotal": snapshot.ntotal, "delta_count": int(snapshot.delta.ntotal) if snapshot.delta is not None else 0,
    }


def records_to_remove(snapshot: Snapshot, root: Path, targets: Iterable[int | str | Path]) -> dict[int, ImageRecord]:
    """The records named by ids, by paths (relative to the root, or absolute inside it) or by folders."""
    ids, paths = removal_targets(targets, root)
    found = snapshot.db.ids_by_path(paths)
    ids.update(found.values())
    for rel in paths:
        if rel not in found:
            ids.update(snapshot.db.ids_under(rel))
    return snapshot.db.get_many(sorted(ids))
