"""The generation commit engine: write the next generation beside the live one, then publish it (store.py);
and generation 1 of a new index.

A change takes one of four paths: re-index every kept vector (a type change, a rebuild, or
tombstones past COMPACT_TOMBSTONE_RATIO); on a large index, share the main FAISS file by a
hard link and edit only the delta segment (segments.py); share the FAISS file (only
tombstones change); or edit a copy of the main index, folding the delta into it. The caller
holds the write locks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from filelock import FileLock

from model.fileio import utc_timestamp

from . import backends, store
from .backends import IndexParams
from .errors import IndexExistsError, IndexStoreError
from .files import relative_to_root, resolve_inside
from .filter_columns import FilterColumns
from .manifest import Manifest
from .metadata import ImageRecord, MetadataReader, MetadataWriter
from .segments import DELTA_FILE, delta_capacity, delta_kind, delta_params
from .snapshot import Snapshot, read_faiss

# An index that cannot delete (HNSW, re-ranked IVF-PQ) is rebuilt without its tombstones past this share.
COMPACT_TOMBSTONE_RATIO = 0.25


def _publish(directory: Path, staging: Path, manifest: Manifest) -> Path:
    (staging / store.MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    return store.publish(directory, staging, manifest.generation)


def create_index_directory(
    directory: Path, *, model_id: str, dim: int, index_type: str, root: str | Path | None,
    params: IndexParams | dict[str, Any] | None, checkpoint_path: str | Path | None, uploads: str,
    lock_timeout: float,
) -> None:
    """Publish generation 1 of a new index (empty FAISS index, empty database, manifest) in `directory`.

    Refuses a folder that holds anything but the leftovers of a create killed before its commit.
    """
    if store.is_index_dir(directory):
        raise IndexExistsError(f"{directory} already holds an index; open it or add to it instead")
    if directory.exists() and (not directory.is_dir() or not store.is_empty_or_crashed_create(directory)):
        raise IndexExistsError(f"{directory} exists and is not an empty folder")
    params = backends.parse_params(params)
    backends.choose_type(index_type, 0)  # validates the name
    resolve_inside(Path("/"), uploads)  # a plain relative folder name
    first = Path(uploads).parts[0] if Path(uploads).parts else "."
    if first.startswith((".", "gen-")) or first == store.CURRENT:  # the index's own entries
        raise IndexStoreError(f"uploads folder {uploads!r} would mix with the index's own files; name another")
    directory.mkdir(parents=True, exist_ok=True)
    root_path = Path(root).expanduser() if root is not None else directory
    if not root_path.is_dir():
        raise IndexStoreError(f"index root {root_path} is not a folder")
    inside = relative_to_root(root_path, directory)
    root_str = inside if inside is not None else str(root_path.resolve())
    kind = "hnsw" if index_type == "hnsw" else "flat"
    index, resolved = backends.new_index(kind, dim, params)
    manifest = Manifest(
        model_id=model_id, dim=dim, index_type=kind, requested_type=index_type, params=resolved,
        root=root_str, uploads=uploads, uploads_in_index=True, generation=1,
        checkpoint_path=str(Path(checkpoint_path).resolve()) if checkpoint_path else None,
    )
    with FileLock(str(directory / store.LOCK), timeout=lock_timeout):
        if store.is_index_dir(directory):
            raise IndexExistsError(f"{directory} already holds an index")
        store.clean_up(directory, live=0)  # leftovers of a create that was killed before it finished
        staging = store.staging_dir(directory, 1)
        faiss.write_index(index, str(staging / store.FAISS_FILE))
        MetadataWriter(staging / store.DB_FILE).finish()
        _publish(directory, staging, manifest)


def _all_vectors(snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray]:
    """Every stored vector of both parts with its id, tombstoned ones included."""
    vecs, ids = backends.vectors_and_ids(snapshot.index, snapshot.manifest.index_type)
    if snapshot.delta is None:
        return vecs, ids
    recent_vecs, recent_ids = backends.vectors_and_ids(snapshot.delta, snapshot.delta_kind)
    return np.concatenate([vecs, recent_vecs]), np.concatenate([ids, recent_ids])


def _reindexed(
    snapshot: Snapshot, *, target: str, params: IndexParams, vectors: np.ndarray, ids: np.ndarray,
    remove_ids: np.ndarray,
) -> tuple[faiss.Index, dict]:
    """A fresh index of type `target` over every kept vector plus the new ones, without tombstones or delta."""
    old_vecs, old_ids = _all_vectors(snapshot)
    keep = ~np.isin(old_ids, np.concatenate([snapshot.tombstones.ids, remove_ids]))
    if keep.any():
        all_vecs, all_ids = np.concatenate([old_vecs[keep], vectors]), np.concatenate([old_ids[keep], ids])
    else:  # a first add, or everything replaced: the new vectors as they are, not a copy of them
        all_vecs, all_ids = vectors, ids
    index, resolved = backends.new_index(target, snapshot.manifest.dim, params, train=all_vecs)
    backends.add(index, all_vecs, all_ids)
    return index, resolved


def _share_file(old_dir: Path, staging: Path, name: str) -> None:
    """A file of the live generation, shared by a hard link (copied where links are refused)."""
    try:
        os.link(old_dir / name, staging / name)
    except OSError:
        shutil.copyfile(old_dir / name, staging / name)


def _editable(index: faiss.Index, path: Path, mmap: bool) -> faiss.Index:
    """A private, writable copy of a live part (read afresh from its file when the live one is mapped)."""
    return faiss.read_index(str(path)) if mmap else faiss.clone_index(index)


def _delta_ids(snapshot: Snapshot) -> np.ndarray:
    return snapshot.delta_stored.held_ids() if snapshot.delta is not None else np.zeros(0, np.int64)


def _folded_copy(
    snapshot: Snapshot, old_dir: Path, *, vectors: np.ndarray, ids: np.ndarray, remove_ids: np.ndarray,
    removable: bool,
) -> tuple[faiss.Index, np.ndarray]:
    """A copy of the main index with the removals (deleted, or tombstoned), the delta's kept vectors folded in
    and the additions; and the tombstones after it."""
    index = _editable(snapshot.index, old_dir / store.FAISS_FILE, snapshot.mmap)
    recent = _delta_ids(snapshot)
    tombstones = np.setdiff1d(snapshot.tombstones.ids, recent)  # the delta's go with it
    main_removals = remove_ids[~np.isin(remove_ids, recent)]
    if len(main_removals):
        if removable:
            backends.remove(index, main_removals)
        else:
            tombstones = np.union1d(tombstones, main_removals)
    if snapshot.delta is not None:
        recent_vecs, recent_ids = backends.vectors_and_ids(snapshot.delta, snapshot.delta_kind)
        keep = ~np.isin(recent_ids, np.concatenate([snapshot.tombstones.ids, remove_ids]))
        vectors, ids = np.concatenate([recent_vecs[keep], vectors]), np.concatenate([recent_ids[keep], ids])
    backends.add(index, vectors, ids)
    return index, tombstones


def _edited_delta(
    snapshot: Snapshot, old_dir: Path, staging: Path, *, vectors: np.ndarray, ids: np.ndarray,
    remove_ids: np.ndarray, params: IndexParams,
) -> tuple[faiss.Index | None, np.ndarray]:
    """The main index left as it is (shared), the delta edited and written: the small-write path.

    The caller has checked that no removal needs the main index rewritten. Returns the delta and the tombstones.
    """
    _share_file(old_dir, staging, store.FAISS_FILE)
    recent = _delta_ids(snapshot)
    in_delta = np.isin(remove_ids, recent)
    tombstones = np.union1d(snapshot.tombstones.ids, remove_ids[~in_delta])  # main removals (non-removable)
    kind = delta_kind(snapshot.manifest.index_type)
    deletes = in_delta.any() and backends.can_remove(kind, {})  # a graph delta keeps tombstones instead
    if not deletes:
        tombstones = np.union1d(tombstones, remove_ids[in_delta])
    delta = snapshot.delta
    if len(ids) or deletes:
        if delta is not None:
            delta = _editable(delta, old_dir / DELTA_FILE, snapshot.mmap)
        else:
            delta = backends.new_index(kind, snapshot.manifest.dim, delta_params(params))[0]
        if deletes:
            backends.remove(delta, remove_ids[in_delta])
        backends.add(delta, vectors, ids)
        faiss.write_index(delta, str(staging / DELTA_FILE))
    elif delta is not None:
        _share_file(old_dir, staging, DELTA_FILE)
    return delta, tombstones


def _write_metadata(
    staging: Path, old_dir: Path, *, records: Sequence[ImageRecord], remove_ids: np.ndarray,
    old_tombstones: np.ndarray, new_tombstones: np.ndarray,
) -> None:
    db = MetadataWriter(staging / store.DB_FILE, copy_from=old_dir / store.DB_FILE)
    try:
        db.delete(remove_ids.tolist())
        db.insert(records)
        if len(new_tombstones) != len(old_tombstones) or not np.array_equal(new_tombstones, old_tombstones):
            db.clear_tombstones()
            db.add_tombstones(new_tombstones.tolist())
        db.finish()
    except BaseException:
        db.abort()
        raise


def commit_generation(
    directory: Path, snapshot: Snapshot, *, vectors: np.ndarray | None = None, ids: np.ndarray | None = None,
    records: Sequence[ImageRecord] = (), remove_ids: np.ndarray | None = None, force_kind: str | None = None,
    requested: str | None = None, params: IndexParams | None = None, uploads_in_index: bool | None = None,
) -> Snapshot:
    """Write and publish the generation after `snapshot` and return it; removals are ids already indexed.

    force_kind re-indexes everything as that type (rebuild); otherwise the type is promoted
    only when the new count calls for it (backends.target_type).
    """
    m = snapshot.manifest
    vectors = np.zeros((0, m.dim), np.float32) if vectors is None else vectors
    ids = np.zeros(0, np.int64) if ids is None else ids
    remove_ids = np.zeros(0, np.int64) if remove_ids is None else remove_ids
    params = params or backends.parse_params(m.params)
    requested = requested or m.requested_type
    kind = m.index_type
    old_tombstones = snapshot.tombstones.ids
    count = m.count + len(ids) - len(remove_ids)
    target = force_kind or backends.target_type(requested, kind, count, params)
    removable = backends.can_remove(kind, m.params)
    tombstones_after = len(old_tombstones) + (0 if removable else len(remove_ids))
    compact = not removable and tombstones_after > COMPACT_TOMBSTONE_RATIO * max(snapshot.ntotal, 1)
    capacity = delta_capacity(int(snapshot.index.ntotal))
    recent_count = int(snapshot.delta.ntotal) if snapshot.delta is not None else 0
    main_rewrite = removable and bool(len(remove_ids)) and not np.isin(remove_ids, _delta_ids(snapshot)).all()
    small_write = capacity > 0 and recent_count + len(ids) <= capacity and not main_rewrite
    generation = snapshot.generation + 1
    staging = store.staging_dir(directory, generation)
    old_dir = directory / store.gen_name(snapshot.generation)
    index, delta, main_kept = snapshot.index, None, True
    try:
        resolved = dict(m.params)
        if force_kind is not None or target != kind or compact:
            index, resolved = _reindexed(
                snapshot, target=target, params=params, vectors=vectors, ids=ids, remove_ids=remove_ids,
            )
            new_tombstones, main_kept = np.zeros(0, np.int64), False
            faiss.write_index(index, str(staging / store.FAISS_FILE))
        elif small_write:
            delta, new_tombstones = _edited_delta(
                snapshot, old_dir, staging, vectors=vectors, ids=ids, remove_ids=remove_ids, params=params,
            )
        elif len(ids) == 0 and not removable and snapshot.delta is None:
            new_tombstones = np.union1d(old_tombstones, remove_ids)  # only tombstones change
            _share_file(old_dir, staging, store.FAISS_FILE)
        else:
            index, new_tombstones = _folded_copy(
                snapshot, old_dir, vectors=vectors, ids=ids, remove_ids=remove_ids, removable=removable,
            )
            main_kept = False
            faiss.write_index(index, str(staging / store.FAISS_FILE))
        _write_metadata(
            staging, old_dir, records=records, remove_ids=remove_ids, old_tombstones=old_tombstones,
            new_tombstones=new_tombstones,
        )
        manifest = replace(
            m, index_type=target, requested_type=requested, params=resolved, count=count,
            tombstones=len(new_tombstones), delta_count=int(delta.ntotal) if delta is not None else 0,
            next_id=max(m.next_id, int(ids.max()) + 1 if len(ids) else 0),
            generation=generation, updated=utc_timestamp(),
            uploads_in_index=m.uploads_in_index if uploads_in_index is None else uploads_in_index,
        )
        gen_dir = _publish(directory, staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if snapshot.mmap and not main_kept:
        index = read_faiss(gen_dir / store.FAISS_FILE, True)
    db = MetadataReader(gen_dir / store.DB_FILE)
    return Snapshot.assemble(
        generation=generation, manifest=manifest, index=index, db=db, tombstone_ids=new_tombstones, mmap=snapshot.mmap,
        delta=delta, same_main_as=snapshot if main_kept else None,
        columns=FilterColumns.following(snapshot.columns, db, removed=remove_ids, added=records),
    )
