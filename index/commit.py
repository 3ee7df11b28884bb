"""The generation commit engine: write the next generation beside the live one, then publish it (store.py);
and generation 1 of a new index.

A change takes one of three paths: re-index every kept vector (a type change, a rebuild, or
tombstones past COMPACT_TOMBSTONE_RATIO), share the FAISS file by a hard link (only
tombstones change), or edit a copy of the live index. The caller holds the write locks.
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
from .manifest import Manifest
from .metadata import ImageRecord, MetadataReader, MetadataWriter
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


def _reindexed(
    snapshot: Snapshot, *, target: str, params: IndexParams, vectors: np.ndarray, ids: np.ndarray,
    remove_ids: np.ndarray,
) -> tuple[faiss.Index, dict]:
    """A fresh index of type `target` over every kept vector plus the new ones, without tombstones."""
    old_vecs, old_ids = backends.vectors_and_ids(snapshot.index, snapshot.manifest.index_type)
    keep = ~np.isin(old_ids, np.concatenate([snapshot.tombstones.ids, remove_ids]))
    all_vecs = np.concatenate([old_vecs[keep], vectors])
    all_ids = np.concatenate([old_ids[keep], ids])
    index, resolved = backends.new_index(target, snapshot.manifest.dim, params, train=all_vecs)
    backends.add(index, all_vecs, all_ids)
    return index, resolved


def _share_faiss_file(old_dir: Path, staging: Path) -> None:
    """The FAISS file of the live generation, shared by a hard link (copied where links are refused)."""
    try:
        os.link(old_dir / store.FAISS_FILE, staging / store.FAISS_FILE)
    except OSError:
        shutil.copyfile(old_dir / store.FAISS_FILE, staging / store.FAISS_FILE)


def _edited_copy(
    snapshot: Snapshot, old_dir: Path, *, vectors: np.ndarray, ids: np.ndarray, remove_ids: np.ndarray,
    removable: bool,
) -> tuple[faiss.Index, np.ndarray]:
    """A copy of the live index with the removals (deleted, or tombstoned) and additions; and the tombstones."""
    if snapshot.mmap:
        index = faiss.read_index(str(old_dir / store.FAISS_FILE))
    else:
        index = faiss.clone_index(snapshot.index)
    tombstones = snapshot.tombstones.ids
    if len(remove_ids):
        if removable:
            backends.remove(index, remove_ids)
        else:
            tombstones = np.union1d(tombstones, remove_ids)
    backends.add(index, vectors, ids)
    return index, tombstones


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
    compact = not removable and tombstones_after > COMPACT_TOMBSTONE_RATIO * max(snapshot.index.ntotal, 1)
    generation = snapshot.generation + 1
    staging = store.staging_dir(directory, generation)
    old_dir = directory / store.gen_name(snapshot.generation)
    try:
        resolved = dict(m.params)
        if force_kind is not None or target != kind or compact:
            index, resolved = _reindexed(
                snapshot, target=target, params=params, vectors=vectors, ids=ids, remove_ids=remove_ids,
            )
            new_tombstones = np.zeros(0, np.int64)
            faiss.write_index(index, str(staging / store.FAISS_FILE))
        elif len(ids) == 0 and not removable:
            index = snapshot.index  # only tombstones change
            new_tombstones = np.union1d(old_tombstones, remove_ids)
            _share_faiss_file(old_dir, staging)
        else:
            index, new_tombstones = _edited_copy(
                snapshot, old_dir, vectors=vectors, ids=ids, remove_ids=remove_ids, removable=removable,
            )
            faiss.write_index(index, str(staging / store.FAISS_FILE))
        _write_metadata(
            staging, old_dir, records=records, remove_ids=remove_ids, old_tombstones=old_tombstones,
            new_tombstones=new_tombstones,
        )
        manifest = replace(
            m, index_type=target, requested_type=requested, params=resolved, count=count,
            tombstones=len(new_tombstones), next_id=max(m.next_id, int(ids.max()) + 1 if len(ids) else 0),
            generation=generation, updated=utc_timestamp(),
            uploads_in_index=m.uploads_in_index if uploads_in_index is None else uploads_in_index,
        )
        gen_dir = _publish(directory, staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if snapshot.mmap:
        index = read_faiss(gen_dir / store.FAISS_FILE, True)
    return Snapshot.assemble(
        generation=generation, manifest=manifest, index=index, db=MetadataReader(gen_dir / store.DB_FILE),
        tombstone_ids=new_tombstones, mmap=snapshot.mmap,
    )
