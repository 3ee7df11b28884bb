"""ImageIndex: a FAISS index of image embeddings plus SQLite metadata, bound to one checkpoint.

Readers search an immutable snapshot (snapshot.py) held in one attribute; a writer builds
the next generation on disk (commit.py), publishes it atomically (store.py) and swaps the
attribute, so a search never sees a half-applied update and needs no lock. Writers are
serialised by a thread lock and, across processes, a file lock. Adds are embedded and
de-duplicated in additions.py.

    idx = ImageIndex.create("indexes/photos", clip, root="photos/")
    idx.add_files(clip, sorted(Path("photos").rglob("*.jpg")))
    idx.search_text(clip, "a dog on a beach", k=5)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from filelock import FileLock, Timeout

from model.fileio import utc_timestamp

from . import backends, store
from .additions import (
    AddTarget,
    EmbedOptions,
    PendingImage,
    files_to_add,
    ingest,
    new_records,
    pending_files,
    pending_uploads,
    select_fresh,
)
from .backends import IndexParams
from .commit import commit_generation, create_index_directory
from .errors import IndexMismatchError, IndexNotFoundError, IndexStoreError
from .files import resolve_all_inside
from .manifest import Manifest
from .metadata import ImageRecord
from .search_filter import SearchFilter
from .snapshot import (
    Snapshot,
    describe_snapshot,
    load_snapshot,
    normalise_vectors,
    records_to_remove,
    search_snapshot,
    verify_snapshot,
)
from .types import AddReport, NewImage, SearchResult
from .uploads import (
    UploadsLayout,
    copy_into_index,
    has_pending,
    journal_deletions,
    settle_pending,
    split_shadowed,
    store_uploads,
)

if TYPE_CHECKING:
    from model import CLIPInference
    from model.image import ImageSource

DEFAULT_LOCK_TIMEOUT = 120.0


def _model_identity(clip: CLIPInference | str, dim: int | None) -> tuple[str, int]:
    if isinstance(clip, str):
        if dim is None:
            raise IndexStoreError("give dim= together with a model id")
        return clip, int(dim)
    return clip.model_id, int(clip.dim)


class ImageIndex:
    """A directory holding a FAISS index, its metadata and manifest; see the module docstring."""

    def __init__(self, directory: Path, snapshot: Snapshot, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.directory = Path(directory)
        self._state = snapshot
        self._mmap = snapshot.mmap
        self._thread_lock = threading.RLock()
        self._file_lock = FileLock(str(self.directory / store.LOCK))
        self._lock_timeout = lock_timeout

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls, path: str | Path, clip: CLIPInference | str, *, dim: int | None = None, index_type: str = "auto",
        root: str | Path | None = None, params: IndexParams | dict[str, Any] | None = None,
        checkpoint_path: str | Path | None = None, uploads: str = "uploads",
    ) -> ImageIndex:
        """A new, empty index directory for embeddings of `clip` (or of model id + dim).

        root is the folder stored paths are relative to (default: the index folder itself);
        add_bytes (and add_files with copy_outside_root) stores files in path/uploads, inside the index.
        """
        model_id, dim = _model_identity(clip, dim)
        directory = Path(path)
        create_index_directory(
            directory, model_id=model_id, dim=dim, index_type=index_type, root=root, params=params,
            checkpoint_path=checkpoint_path, uploads=uploads, lock_timeout=DEFAULT_LOCK_TIMEOUT,
        )
        return cls.open(directory)

    @classmethod
    def open(
        cls, path: str | Path, model_id: str | None = None, mmap: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> ImageIndex:
        """Load an index; with model_id, refuse one built by another checkpoint.

        mmap maps the FAISS data instead of reading it into memory (large indexes).
        """
        directory = Path(path)
        if not directory.is_dir():
            raise IndexNotFoundError(f"index {directory} does not exist")
        idx = cls(directory, load_snapshot(directory, mmap), lock_timeout)
        if model_id is not None:
            idx.check_model(model_id)
        if has_pending(directory):
            idx._settle_if_free()
        return idx

    def _settle_if_free(self) -> None:
        """Clean up after a writer that crashed between storing a file and committing it, unless one is writing."""
        try:
            with self._thread_lock, self._file_lock.acquire(timeout=0):
                self._settle_uploads()
        except (Timeout, OSError, IndexStoreError):  # a live writer (which settles it), a read-only copy, or a
            pass  # journal the next write reports: opening to read does not depend on the clean-up

    def _settle_uploads(self) -> list[str]:
        """Unlink the journalled files the live generation does not refer to (the write lock is held).

        Live means on disk: a commit that published and then failed (or was interrupted) before this object
        took it up would otherwise have its new files judged against the generation before it.
        """
        if store.read_current(self.directory) != self._state.generation:
            self._state = load_snapshot(self.directory, self._mmap)
        return settle_pending(self._uploads, lambda rels: self._state.db.ids_by_path(rels).keys())

    def close(self) -> None:
        """Release the database handle; the object is unusable afterwards."""
        self._state.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ identity
    @property
    def manifest(self) -> Manifest:
        return self._state.manifest

    @property
    def model_id(self) -> str:
        return self._state.manifest.model_id

    @property
    def dim(self) -> int:
        return self._state.manifest.dim

    @property
    def index_type(self) -> str:
        return self._state.manifest.index_type

    @property
    def generation(self) -> int:
        return self._state.generation

    @property
    def root(self) -> Path:
        root = Path(self._state.manifest.root)
        return (root if root.is_absolute() else self.directory / root).resolve()

    @property
    def _uploads(self) -> UploadsLayout:
        m = self._state.manifest
        return UploadsLayout(self.directory.resolve(), self.root, m.uploads, m.uploads_in_index)

    @property
    def uploads_dir(self) -> Path:
        """The folder of the files the index stores itself: in the index directory, or the root for older indexes."""
        return self._uploads.path

    def __len__(self) -> int:
        return self._state.manifest.count

    def check_model(self, clip: CLIPInference | str) -> None:
        """Refuse embeddings from another checkpoint: their vectors live in a different space."""
        model_id = clip if isinstance(clip, str) else clip.model_id
        m = self._state.manifest
        if model_id != m.model_id:
            raise IndexMismatchError(
                f"index {self.directory} was built with checkpoint {m.model_id[:12]}, not {str(model_id)[:12]}; "
                f"use that checkpoint or rebuild the index with `clipforge index build`"
            )
        if not isinstance(clip, str) and clip.dim != m.dim:
            raise IndexMismatchError(f"index holds {m.dim}-d embeddings but the model makes {clip.dim}-d ones")

    def info(self) -> dict[str, Any]:
        return describe_snapshot(self._state, directory=self.directory, root=self.root, uploads_dir=self.uploads_dir)

    # ------------------------------------------------------------------ reading
    def reload_if_changed(self) -> bool:
        """Pick up a generation committed by another process; True when it changed."""
        if store.read_current(self.directory) == self._state.generation:
            return False
        with self._thread_lock:
            if store.read_current(self.directory) == self._state.generation:
                return False
            self._state = load_snapshot(self.directory, self._mmap)
            return True

    def get(self, image_id: int) -> ImageRecord | None:
        return self._state.db.get_many([int(image_id)]).get(int(image_id))

    def records(self, offset: int = 0, limit: int = 100) -> list[ImageRecord]:
        """A page of records in id order (for listings)."""
        return self._state.db.page(max(0, int(offset)), max(0, min(int(limit), 10_000)))

    def resolve_path(self, image_id: int) -> Path:
        """The absolute file of an indexed image, guaranteed to be inside the root."""
        record = self.get(image_id)
        if record is None:
            raise IndexStoreError(f"no image with id {image_id} in the index")
        return self._uploads.resolve(record.path)

    def search_by_vector(
        self, vectors: np.ndarray, k: int, min_score: float | None = None, *,
        ef_search: int | None = None, nprobe: int | None = None, filter: SearchFilter | None = None,
    ) -> list[list[SearchResult]]:
        """The k most similar images for each query vector (rows of `vectors`), best first.

        filter keeps only images meeting its conditions, applied before the k are chosen.
        """
        return search_snapshot(
            self._state, vectors, k, min_score=min_score, ef_search=ef_search, nprobe=nprobe, conditions=filter,
        )

    def search_text(self, clip: CLIPInference, text: str, k: int = 10, min_score: float | None = None) -> list[SearchResult]:
        self.check_model(clip)
        return self.search_by_vector(clip.embed_texts([text]), k, min_score)[0]

    def search_image(
        self, clip: CLIPInference, image_source: ImageSource, k: int = 10, min_score: float | None = None
    ) -> list[SearchResult]:
        self.check_model(clip)
        return self.search_by_vector(clip.embed_images([image_source]), k, min_score)[0]

    def verify(self) -> dict[str, int]:
        """Check that FAISS, SQLite and the manifest agree; raises IndexStoreError when they do not."""
        return verify_snapshot(self._state, self.directory)

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the thread and file locks, with the newest committed generation loaded."""
        with self._thread_lock:
            try:
                with self._file_lock.acquire(timeout=self._lock_timeout):
                    if store.read_current(self.directory) != self._state.generation:
                        self._state = load_snapshot(self.directory, self._mmap)
                    self._settle_uploads()  # what a crashed writer left
                    if not self._state.manifest.uploads_in_index:
                        self._adopt_uploads()
                    try:
                        yield
                    finally:
                        self._settle_uploads()  # this write's files: kept if committed, else unlinked
            except Timeout as exc:
                raise IndexStoreError(
                    f"index {self.directory} is locked by another writer (waited {self._lock_timeout:.0f}s)"
                ) from exc

    def _adopt_uploads(self) -> None:
        """An older index's first write moves its uploads into its own folder, so its copies stop sharing them."""
        db, folder = self._state.db, self._state.manifest.uploads
        copy_into_index(self._uploads, [r.path for r in db.get_many(db.ids_under(folder)).values()])
        self._swap(commit_generation(self.directory, self._state, uploads_in_index=True))

    def _add_target(self) -> AddTarget:
        return AddTarget(
            ids_by_hash=lambda hashes: self._state.db.ids_by_hash(hashes), commit=self._commit_adds, size=self.__len__,
        )

    def add_files(
        self, clip: CLIPInference, paths: Sequence[str | Path], captions: Sequence[str | None] | None = None, *,
        copy_outside_root: bool = False, batch_size: int = 64, workers: int | None = None, progress: bool = False,
        max_bytes: int | None = None, commit_every: int | None = None,
    ) -> AddReport:
        """Embed and add image files; files whose content is already indexed are reported as duplicates.

        Files must lie inside the root unless copy_outside_root copies them into the uploads
        folder. A long run commits every `commit_every` images (default: grows with the
        index), so a crash loses at most the uncommitted tail and rerunning resumes.
        """
        self.check_model(clip)
        if captions is not None and len(captions) != len(paths):
            raise IndexStoreError(f"{len(captions)} captions for {len(paths)} files")
        files, failed = files_to_add(paths, captions, root=self.root, copy_outside_root=copy_outside_root)
        files, shadowed = split_shadowed(self._uploads, files, copy=copy_outside_root)
        report = AddReport(failed=failed + shadowed)
        options = EmbedOptions(
            batch_size=batch_size, workers=workers, progress=progress, max_bytes=max_bytes, commit_every=commit_every,
        )
        report.merge(ingest(
            clip, [f.source for f in files], pending_for=pending_files(files, self._state.manifest.uploads),
            target=self._add_target(), options=options,
        ))
        return report

    def add_bytes(
        self, clip: CLIPInference, items: Sequence[tuple[str, bytes, str | None]], *, max_bytes: int | None = None
    ) -> AddReport:
        """Add uploaded images (filename, content, caption): stored in the uploads folder (`uploads_dir`), then indexed."""
        self.check_model(clip)
        return ingest(
            clip, [content for _, content, _ in items], pending_for=pending_uploads(items, self._state.manifest.uploads),
            target=self._add_target(), options=EmbedOptions(workers=0, max_bytes=max_bytes),
            names=[name for name, _, _ in items],
        )

    def add_embeddings(self, vectors: np.ndarray, images: Sequence[NewImage]) -> AddReport:
        """Add precomputed embeddings (from this index's checkpoint) with their metadata."""
        vecs = normalise_vectors(vectors, self.dim) if len(images) else np.zeros((0, self.dim), np.float32)
        if len(vecs) != len(images):
            raise IndexStoreError(f"{len(vecs)} vectors for {len(images)} images")
        resolve_all_inside(self.root, [im.path for im in images])
        return self._commit_adds([PendingImage(im.path, im, v) for im, v in zip(images, vecs)])

    def _commit_adds(self, pending: list[PendingImage]) -> AddReport:
        with self._writing():
            selected = select_fresh(pending, self._state.db)
            report = AddReport(duplicates=selected.duplicates)
            if not selected.fresh:
                return report
            store_uploads(self._uploads, [(p.image.path, p.upload) for p in selected.fresh if p.upload is not None])
            start = self._state.manifest.next_id
            ids = np.arange(start, start + len(selected.fresh), dtype=np.int64)
            vectors = normalise_vectors(np.stack([p.vector for p in selected.fresh]), self.dim)
            records = new_records(selected.fresh, ids, utc_timestamp())
            replaced = np.array(selected.replaced, dtype=np.int64)
            self._swap(commit_generation(
                self.directory, self._state, vectors=vectors, ids=ids, records=records, remove_ids=replaced,
            ))
            report.added = [int(i) for i in ids]
            report.replaced = selected.replaced
        return report

    def remove(self, targets: Iterable[int | str | Path]) -> int:
        """Remove images by id, by path or by folder (relative to the root, or absolute inside it or inside the
        index's own uploads folder); returns how many."""
        with self._writing():
            mapped = [self._uploads.removal_target(t) for t in targets]
            records = records_to_remove(self._state, self.root, [t for t in mapped if t is not None])
            if not records:
                return 0
            remove_ids = np.array(sorted(records), dtype=np.int64)
            journal_deletions(self._uploads, records.values())  # files we stored ourselves go with their entry,
            self._swap(commit_generation(self.directory, self._state, remove_ids=remove_ids))
            return len(records)  # unlinked when the write settles, now that no live record refers to them

    def rebuild(self, index_type: str | None = None, params: IndexParams | dict[str, Any] | None = None) -> None:
        """Re-index the stored vectors (compacts tombstones; can change the type or its parameters)."""
        with self._writing():
            m = self._state.manifest
            requested = index_type or m.requested_type
            backends.choose_type(requested, 0)
            merged = {**m.params, **(params.model_dump() if isinstance(params, IndexParams) else (params or {}))}
            new_params = backends.parse_params(merged)
            kind = backends.fitting_type(requested, m.count, new_params)
            self._swap(commit_generation(
                self.directory, self._state, force_kind=kind, requested=requested, params=new_params,
            ))

    def _swap(self, committed: Snapshot) -> None:
        """Serve a just-committed generation, then drop the ones no reader needs any more."""
        self._state = committed
        store.clean_up(self.directory, committed.generation)
