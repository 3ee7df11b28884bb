"""ImageIndex: a FAISS index of image embeddings plus SQLite metadata, bound to one checkpoint.

Readers search an immutable snapshot (FAISS index, read-only database, manifest, tombstones)
held in one attribute; a writer builds the next generation on disk, publishes it atomically
(see store.py) and swaps the attribute, so a search never sees a half-applied update and
needs no lock. Writers are serialised by a thread lock and, across processes, a file lock.

    idx = ImageIndex.create("indexes/photos", clip, root="photos/")
    idx.add_files(clip, sorted(Path("photos").rglob("*.jpg")))
    idx.search_text(clip, "a dog on a beach", k=5)
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import faiss
import numpy as np
from filelock import FileLock, Timeout

from . import backends, store
from .backends import IndexParams, Tombstones
from .errors import (
    IndexExistsError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStoreError,
)
from .files import relative_to_root, resolve_inside, safe_filename
from .manifest import Manifest, utc_now
from .metadata import ImageRecord, MetadataReader, MetadataWriter

if TYPE_CHECKING:  # annotations only; the embedding pipeline (ingest.py) is imported when first used
    from model import CLIPInference
    from model.image import ImageSource

    from .ingest import Decoded

# An index that cannot delete (HNSW, re-ranked IVF-PQ) is rebuilt without its tombstones past this share.
COMPACT_TOMBSTONE_RATIO = 0.25
DEFAULT_LOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class SearchResult:
    id: int
    score: float
    path: str  # relative to the index root
    caption: str | None
    width: int
    height: int


@dataclass
class AddReport:
    """What an add did: new ids, inputs already indexed (with the id holding them), failures with reasons."""

    added: list[int] = field(default_factory=list)
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)  # ids dropped because their file's content changed

    def merge(self, other: AddReport) -> None:
        self.added += other.added
        self.duplicates += other.duplicates
        self.failed += other.failed
        self.replaced += other.replaced


@dataclass(frozen=True)
class NewImage:
    """Metadata of an image to add with a precomputed embedding (path relative to the root)."""

    path: str
    sha256: str
    width: int
    height: int
    caption: str | None = None


@dataclass
class _Pending:
    name: str  # how the caller named the input (for reports)
    image: NewImage
    vector: np.ndarray
    upload: Path | bytes | None = None  # content to store at root/image.path before committing


@dataclass(frozen=True)
class _Snapshot:
    generation: int
    manifest: Manifest
    index: faiss.Index
    db: MetadataReader
    tombstones: Tombstones
    mmap: bool
    half_scan: backends.HalfPrecisionScan | None = None


def _normalise(vectors: np.ndarray, dim: int) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise IndexStoreError(f"expected vectors of shape (n, {dim}), got {tuple(np.shape(vectors))}")
    if not np.isfinite(arr).all():
        raise IndexStoreError("vectors contain NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return np.ascontiguousarray(arr / np.maximum(norms, 1e-12), dtype=np.float32)


def _model_identity(clip: CLIPInference | str, dim: int | None) -> tuple[str, int]:
    if isinstance(clip, str):
        if dim is None:
            raise IndexStoreError("give dim= together with a model id")
        return clip, int(dim)
    return clip.model_id, int(clip.dim)


def _read_faiss(path: Path, mmap: bool) -> faiss.Index:
    # Full-size vector storage (flat, HNSW storage, IVF-PQ float16 re-rank copies) is mapped; PQ codes are read.
    flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise IndexStoreError(f"cannot read FAISS index {path}: {str(exc).splitlines()[0]}") from exc


def _load_snapshot(directory: Path, mmap: bool) -> _Snapshot:
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
            index = _read_faiss(gen_dir / store.FAISS_FILE, mmap)
        except IndexStoreError as exc:
            if store.read_current(directory) != generation:
                last = exc
                continue  # replaced under us: read the new pointer
            raise
        if index.d != manifest.dim:
            raise IndexStoreError(f"{gen_dir}: FAISS index has dimension {index.d}, manifest says {manifest.dim}")
        tomb = Tombstones(np.array(db.tombstones() if manifest.tombstones else [], dtype=np.int64), index, manifest.index_type)
        half = backends.HalfPrecisionScan.for_index(index, manifest.index_type, mmap)
        return _Snapshot(generation, manifest, index, db, tomb, mmap, half)
    raise IndexStoreError(f"{directory} keeps changing while being opened: {last}")


class ImageIndex:
    """A directory holding a FAISS index, its metadata and manifest; see the module docstring."""

    def __init__(self, directory: Path, snapshot: _Snapshot, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
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
        add_bytes stores files in root/uploads.
        """
        model_id, dim = _model_identity(clip, dim)
        directory = Path(path)
        if store.is_index_dir(directory):
            raise IndexExistsError(f"{directory} already holds an index; open it or add to it instead")
        if directory.exists() and (not directory.is_dir() or not store.is_empty_or_crashed_create(directory)):
            raise IndexExistsError(f"{directory} exists and is not an empty folder")
        params = backends.parse_params(params)
        backends.choose_type(index_type, 0)  # validates the name
        resolve_inside(Path("/"), uploads)  # a plain relative folder name
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
            root=root_str, uploads=uploads, generation=1,
            checkpoint_path=str(Path(checkpoint_path).resolve()) if checkpoint_path else None,
        )
        with FileLock(str(directory / store.LOCK), timeout=DEFAULT_LOCK_TIMEOUT):
            if store.is_index_dir(directory):
                raise IndexExistsError(f"{directory} already holds an index")
            store.clean_up(directory, live=0)  # leftovers of a create that was killed before it finished
            staging = store.staging_dir(directory, 1)
            faiss.write_index(index, str(staging / store.FAISS_FILE))
            MetadataWriter(staging / store.DB_FILE).finish()
            (staging / store.MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
            store.publish(directory, staging, 1)
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
        idx = cls(directory, _load_snapshot(directory, mmap), lock_timeout)
        if model_id is not None:
            idx.check_model(model_id)
        return idx

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
    def uploads_dir(self) -> Path:
        return self.root / self._state.manifest.uploads

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
        st = self._state
        m = st.manifest
        try:
            size = sum(f.stat().st_size for f in (self.directory / store.gen_name(st.generation)).iterdir())
        except FileNotFoundError:  # retired by a writer in another process since we loaded it
            size = 0
        return {
            "path": str(self.directory), "count": m.count, "index_type": m.index_type, "requested_type": m.requested_type,
            "params": dict(m.params), "dim": m.dim, "metric": m.metric, "checkpoint_hash": m.model_id,
            "checkpoint_path": m.checkpoint_path, "root": str(self.root), "uploads": str(self.uploads_dir),
            "tombstones": m.tombstones, "next_id": m.next_id, "generation": st.generation,
            "created": m.created, "updated": m.updated, "size_bytes": size, "mmap": st.mmap,
            "faiss_ntotal": int(st.index.ntotal),
        }

    # ------------------------------------------------------------------ reading
    def reload_if_changed(self) -> bool:
        """Pick up a generation committed by another process; True when it changed."""
        if store.read_current(self.directory) == self._state.generation:
            return False
        with self._thread_lock:
            if store.read_current(self.directory) == self._state.generation:
                return False
            self._state = _load_snapshot(self.directory, self._mmap)
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
        return resolve_inside(self.root, record.path)

    def search_by_vector(
        self, vectors: np.ndarray, k: int, min_score: float | None = None, *,
        ef_search: int | None = None, nprobe: int | None = None,
    ) -> list[list[SearchResult]]:
        """The k most similar images for each query vector (rows of `vectors`), best first."""
        st = self._state
        queries = _normalise(vectors, st.manifest.dim)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise IndexStoreError(f"k must be a positive integer, got {k!r}")
        if st.manifest.count == 0:
            return [[] for _ in range(len(queries))]
        kk = int(min(k, st.index.ntotal))
        scores, ids = backends.search(
            st.index, st.manifest.index_type, queries, kk, st.manifest.params, st.tombstones, ef_search, nprobe,
            st.half_scan,
        )
        records = st.db.get_many([int(i) for i in np.unique(ids) if i >= 0])
        out: list[list[SearchResult]] = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, image_id in zip(row_scores, row_ids):
                rec = records.get(int(image_id))
                if rec is None or (min_score is not None and score < min_score):
                    continue
                hits.append(SearchResult(rec.id, float(score), rec.path, rec.caption, rec.width, rec.height))
            out.append(hits[:k])
        return out

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
        st = self._state
        faiss_ids = backends.stored_ids(st.index, st.manifest.index_type)
        live = np.setdiff1d(faiss_ids, st.tombstones.ids)
        db_ids = np.array(st.db.all_ids(), dtype=np.int64)
        problems = []
        if len(faiss_ids) != len(np.unique(faiss_ids)):
            problems.append("duplicate ids in FAISS")
        if not np.array_equal(np.sort(live), db_ids):
            problems.append(f"FAISS holds {len(live)} live ids, SQLite {len(db_ids)} rows, and they differ")
        if st.manifest.count != len(db_ids):
            problems.append(f"manifest count {st.manifest.count} != {len(db_ids)} rows")
        if st.manifest.tombstones != len(st.tombstones):
            problems.append(f"manifest tombstones {st.manifest.tombstones} != {len(st.tombstones)}")
        if len(db_ids) and db_ids.max() >= st.manifest.next_id:
            problems.append("an id is not below next_id")
        if problems:
            raise IndexStoreError(f"index {self.directory} is inconsistent: " + "; ".join(problems))
        return {"count": len(db_ids), "faiss_ntotal": int(st.index.ntotal), "tombstones": len(st.tombstones)}

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the thread and file locks, with the newest committed generation loaded."""
        with self._thread_lock:
            try:
                with self._file_lock.acquire(timeout=self._lock_timeout):
                    if store.read_current(self.directory) != self._state.generation:
                        self._state = _load_snapshot(self.directory, self._mmap)
                    yield
            except Timeout as exc:
                raise IndexStoreError(
                    f"index {self.directory} is locked by another writer (waited {self._lock_timeout:.0f}s)"
                ) from exc

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
        report = AddReport()
        sources: list[Path] = []
        names: list[tuple[str, str | None, bool, str | None]] = []  # (name, rel path, copy?, caption)
        root = self.root
        for i, raw in enumerate(paths):
            p = Path(raw)
            caption = captions[i] if captions is not None else None
            if not p.is_file():
                report.failed.append((str(raw), "no such file" if not p.exists() else "not a regular file"))
                continue
            rel = relative_to_root(p, root)
            if rel is None and not copy_outside_root:
                report.failed.append((str(raw), f"outside the index root {root}; move it there or copy it in (--copy)"))
                continue
            sources.append(p)
            names.append((str(raw), rel, rel is None, caption))

        def make(d: Decoded) -> _Pending:
            name, rel, copy, caption = names[d.position]
            if copy:
                rel = f"{self._state.manifest.uploads}/{safe_filename(Path(name).name, d.sha256)}"
            return _Pending(name, NewImage(rel, d.sha256, d.width, d.height, caption), np.empty(0), sources[d.position] if copy else None)

        self._ingest(clip, sources, make, report, batch_size, workers, progress, max_bytes, commit_every)
        return report

    def add_bytes(
        self, clip: CLIPInference, items: Sequence[tuple[str, bytes, str | None]], *, max_bytes: int | None = None
    ) -> AddReport:
        """Add uploaded images (filename, content, caption): stored under root/uploads, then indexed."""
        self.check_model(clip)
        report = AddReport()
        uploads = self._state.manifest.uploads

        def make(d: Decoded) -> _Pending:
            name, content, caption = items[d.position]
            rel = f"{uploads}/{safe_filename(name, d.sha256)}"
            return _Pending(name, NewImage(rel, d.sha256, d.width, d.height, caption), np.empty(0), content)

        self._ingest(clip, [c for _, c, _ in items], make, report, 64, 0, False, max_bytes, None, [n for n, _, _ in items])
        return report

    def _ingest(
        self, clip: CLIPInference, sources: Sequence[Path | bytes], make: Any, report: AddReport, batch_size: int,
        workers: int | None, progress: bool, max_bytes: int | None, commit_every: int | None,
        names: Sequence[str] | None = None,
    ) -> None:
        from .ingest import DEFAULT_MAX_FILE_BYTES, embed_sources

        seen: set[str] = set()  # hashes met earlier in this call
        repeats: list[tuple[str, str]] = []  # (name, hash) of inputs repeating an earlier input

        def name_of(position: int) -> str:
            return names[position] if names is not None else str(sources[position])

        def skip(items: list[Decoded]) -> set[int]:
            known = self._state.db.ids_by_hash([d.sha256 for d in items])
            drop = set()
            for d in items:
                if d.sha256 in known:
                    report.duplicates.append((name_of(d.position), known[d.sha256]))
                    drop.add(d.position)
                elif d.sha256 in seen:
                    repeats.append((name_of(d.position), d.sha256))
                    drop.add(d.position)
                else:
                    seen.add(d.sha256)
            return drop

        pending: list[_Pending] = []
        for batch in embed_sources(
            clip, sources, batch_size=batch_size, workers=workers,
            max_bytes=max_bytes or DEFAULT_MAX_FILE_BYTES, skip=skip, progress=progress,
        ):
            report.failed.extend((name_of(d.position), d.error or "failed") for d in batch.failed)
            for d, vec in zip(batch.items, batch.vectors):
                item = make(d)
                item.vector = vec
                pending.append(item)
            if len(pending) >= (commit_every or max(10_000, len(self))):
                report.merge(self._commit_adds(pending))
                pending = []
        if pending:
            report.merge(self._commit_adds(pending))
        if repeats:  # point each repeat at the id its first copy received
            ids = self._state.db.ids_by_hash([h for _, h in repeats])
            report.duplicates.extend((name, ids.get(h, -1)) for name, h in repeats)

    def add_embeddings(self, vectors: np.ndarray, images: Sequence[NewImage]) -> AddReport:
        """Add precomputed embeddings (from this index's checkpoint) with their metadata."""
        vecs = _normalise(vectors, self.dim) if len(images) else np.zeros((0, self.dim), np.float32)
        if len(vecs) != len(images):
            raise IndexStoreError(f"{len(vecs)} vectors for {len(images)} images")
        for im in images:
            resolve_inside(self.root, im.path)
        return self._commit_adds([_Pending(im.path, im, v) for im, v in zip(images, vecs)])

    def _commit_adds(self, pending: list[_Pending]) -> AddReport:
        report = AddReport()
        with self._writing():
            st = self._state
            known = st.db.ids_by_hash([p.image.sha256 for p in pending])
            fresh: list[_Pending] = []
            hashes: set[str] = set()
            for p in pending:
                if p.image.sha256 in known:
                    report.duplicates.append((p.name, known[p.image.sha256]))
                elif p.image.sha256 not in hashes:
                    hashes.add(p.image.sha256)
                    fresh.append(p)
            # one record per path: a file whose content changed replaces its old entry
            by_path: dict[str, _Pending] = {p.image.path: p for p in fresh}
            fresh = [p for p in fresh if by_path[p.image.path] is p]
            replaced = list(st.db.ids_by_path(list(by_path)).values())
            if not fresh:
                return report
            for p in fresh:
                if p.upload is not None:
                    self._store_upload(p.image.path, p.upload)
            start = st.manifest.next_id
            ids = np.arange(start, start + len(fresh), dtype=np.int64)
            now = utc_now()
            records = [
                ImageRecord(int(i), p.image.path, p.image.caption, int(p.image.width), int(p.image.height), p.image.sha256, now)
                for i, p in zip(ids, fresh)
            ]
            vectors = _normalise(np.stack([p.vector for p in fresh]), st.manifest.dim)
            self._commit(vectors, ids, records, np.array(replaced, dtype=np.int64))
            report.added = [int(i) for i in ids]
            report.replaced = replaced
        return report

    def _store_upload(self, rel: str, content: Path | bytes) -> None:
        """Write an uploaded file durably (temp file, fsync, rename) before the index refers to it."""
        target = resolve_inside(self.root, rel)
        data = content if isinstance(content, (bytes, bytearray)) else Path(content).read_bytes()
        if target.is_file() and target.stat().st_size == len(data):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        store.fsync_path(target.parent)

    def remove(self, targets: Iterable[int | str | Path]) -> int:
        """Remove images by id, by path (relative to the root, or absolute inside it) or by folder; returns how many."""
        targets = list(targets)
        with self._writing():
            st = self._state
            ids: set[int] = set()
            paths: list[str] = []
            for t in targets:
                if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
                    ids.add(int(t))
                    continue
                p = Path(t)
                rel = relative_to_root(p, self.root) if p.is_absolute() else Path(str(t)).as_posix()
                if rel is not None:
                    paths.append(rel.rstrip("/"))
            found = st.db.ids_by_path(paths)
            ids.update(found.values())
            for rel in paths:
                if rel not in found:
                    ids.update(st.db.ids_under(rel))
            records = st.db.get_many(sorted(ids))
            if not records:
                return 0
            remove_ids = np.array(sorted(records), dtype=np.int64)
            self._commit(np.zeros((0, st.manifest.dim), np.float32), np.zeros(0, np.int64), [], remove_ids)
            uploads_prefix = st.manifest.uploads.rstrip("/") + "/"
            for rec in records.values():  # files we stored ourselves go with their entry
                if rec.path.startswith(uploads_prefix):
                    try:
                        resolve_inside(self.root, rec.path).unlink(missing_ok=True)
                    except (OSError, IndexStoreError):
                        pass
            return len(records)

    def rebuild(self, index_type: str | None = None, params: IndexParams | dict[str, Any] | None = None) -> None:
        """Re-index the stored vectors (compacts tombstones; can change the type or its parameters)."""
        with self._writing():
            m = self._state.manifest
            requested = index_type or m.requested_type
            backends.choose_type(requested, 0)
            merged = {**m.params, **(params.model_dump() if isinstance(params, IndexParams) else (params or {}))}
            new_params = backends.parse_params(merged)
            count = m.count
            kind = backends.choose_type(requested, count)
            if kind == "ivfpq" and not backends.ivfpq_trainable(count, new_params):
                kind = "flat" if requested == "ivfpq" else "hnsw"
            self._commit(
                np.zeros((0, m.dim), np.float32), np.zeros(0, np.int64), [], np.zeros(0, np.int64),
                force_kind=kind, requested=requested, params=new_params,
            )

    def _commit(
        self, vectors: np.ndarray, ids: np.ndarray, records: list[ImageRecord], remove_ids: np.ndarray, *,
        force_kind: str | None = None, requested: str | None = None, params: IndexParams | None = None,
    ) -> None:
        """Write and publish the next generation; the caller holds the write locks."""
        st = self._state
        m = st.manifest
        params = params or backends.parse_params(m.params)
        requested = requested or m.requested_type
        kind = m.index_type
        old_tomb = st.tombstones.ids
        count = m.count + len(ids) - len(remove_ids)
        target = force_kind or backends.target_type(requested, kind, count, params)
        removable = backends.can_remove(kind, m.params)
        n_tomb_after = len(old_tomb) + (0 if removable else len(remove_ids))
        compact = not removable and n_tomb_after > COMPACT_TOMBSTONE_RATIO * max(st.index.ntotal, 1)
        generation = st.generation + 1
        staging = store.staging_dir(self.directory, generation)
        old_dir = self.directory / store.gen_name(st.generation)
        try:
            new_tomb = old_tomb
            resolved = dict(m.params)
            if force_kind is not None or target != kind or compact:
                old_vecs, old_ids = backends.vectors_and_ids(st.index, kind)
                keep = ~np.isin(old_ids, np.concatenate([old_tomb, remove_ids]))
                all_vecs = np.concatenate([old_vecs[keep], vectors])
                all_ids = np.concatenate([old_ids[keep], ids])
                index, resolved = backends.new_index(target, m.dim, params, train=all_vecs)
                backends.add(index, all_vecs, all_ids)
                new_tomb = np.zeros(0, np.int64)
                faiss.write_index(index, str(staging / store.FAISS_FILE))
            elif len(ids) == 0 and not removable:
                index = st.index  # only tombstones change: the FAISS file is shared with the old generation
                new_tomb = np.union1d(old_tomb, remove_ids)
                try:
                    os.link(old_dir / store.FAISS_FILE, staging / store.FAISS_FILE)
                except OSError:
                    shutil.copyfile(old_dir / store.FAISS_FILE, staging / store.FAISS_FILE)
            else:
                index = faiss.read_index(str(old_dir / store.FAISS_FILE)) if st.mmap else faiss.clone_index(st.index)
                if len(remove_ids):
                    if removable:
                        backends.remove(index, remove_ids)
                    else:
                        new_tomb = np.union1d(old_tomb, remove_ids)
                backends.add(index, vectors, ids)
                faiss.write_index(index, str(staging / store.FAISS_FILE))
            db = MetadataWriter(staging / store.DB_FILE, copy_from=old_dir / store.DB_FILE)
            try:
                db.delete(remove_ids.tolist())
                db.insert(records)
                if len(new_tomb) != len(old_tomb) or not np.array_equal(new_tomb, old_tomb):
                    db.clear_tombstones()
                    db.add_tombstones(new_tomb.tolist())
                db.finish()
            except BaseException:
                db.abort()
                raise
            manifest = replace(
                m, index_type=target, requested_type=requested, params=resolved, count=count,
                tombstones=len(new_tomb), next_id=max(m.next_id, int(ids.max()) + 1 if len(ids) else 0),
                generation=generation, updated=utc_now(),
            )
            (staging / store.MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
            gen_dir = store.publish(self.directory, staging, generation)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if st.mmap:
            index = _read_faiss(gen_dir / store.FAISS_FILE, True)
        half = backends.HalfPrecisionScan.for_index(index, target, st.mmap)
        self._state = _Snapshot(
            generation, manifest, index, MetadataReader(gen_dir / store.DB_FILE), Tombstones(new_tomb, index, target), st.mmap,
            half,
        )
        store.clean_up(self.directory, generation)
