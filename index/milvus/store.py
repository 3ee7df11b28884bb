"""MilvusImageIndex: ImageIndex's operations and semantics on a Milvus collection shared by many processes.

Nothing is held locally but the binding record read at open and a cache of served image files,
so every replica answers from the same vectors: a write acknowledged through one is seen by the
next read through any other. Differences from the FAISS store, by design:

- ids are derived from the content hash (its first 62 bits), so two replicas adding the same
  image at once write the same row instead of racing for a counter;
- image bytes are stored in the companion collection (files.py), up to max_image_bytes each;
- the vector index (flat or HNSW) is fixed at build: there is no rebuild.

    idx = MilvusImageIndex.create("milvus://milvus:19530/photos", clip, root="photos/")
    idx.add_files(clip, sorted(Path("photos").rglob("*.jpg")))
    idx.search_text(clip, "a dog on a beach", k=5)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from model.fileio import utc_timestamp

from ..additions import (
    AddTarget,
    EmbedOptions,
    PendingImage,
    files_to_add,
    ingest,
    pending_files,
    pending_uploads,
)
from ..errors import (
    IndexMismatchError,
    IndexStoreError,
)
from ..files import removal_targets, resolve_inside
from ..locations import MilvusLocation, parse_milvus
from ..metadata import ImageRecord
from ..search_filter import SearchFilter
from ..types import AddReport, NewImage, SearchResult
from .checks import verify_rows
from .connection import (
    QUERY_LIMIT,
    STRONG,
    MilvusClient,
    connect,
    disconnect,
    files_collection,
    filter_expression,
    like_literal,
    milvus_errors,
)
from .files import DEFAULT_MAX_IMAGE_BYTES, ImageFiles
from .rows import ROWS_PER_CALL, CollectionRows
from .setup import existing_collections, new_collections
from .writes import content_id, image_row, plan_adds, stored_content, unit_rows

if TYPE_CHECKING:
    from model import CLIPInference
    from model.image import ImageSource

_RECORD_FIELDS = ["id", "path", "caption", "width", "height", "sha256", "added", "chunks", "size_bytes"]


def _location(where: MilvusLocation | str) -> MilvusLocation:
    return where if isinstance(where, MilvusLocation) else parse_milvus(str(where))


def _record(row: dict[str, Any]) -> ImageRecord:
    return ImageRecord(int(row["id"]), row["path"], row.get("caption"), int(row["width"]), int(row["height"]),
                       row["sha256"], row["added"])


class MilvusImageIndex:
    """An image index in a Milvus collection; see the module docstring."""

    def __init__(self, where: MilvusLocation, client: MilvusClient, meta: dict[str, Any], *,
                 cache_dir: Path | None = None) -> None:
        self.where, self._client, self._meta = where, client, meta
        self.files = ImageFiles(client, where, cache_dir)
        self.rows = CollectionRows(client, where)

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls, where: MilvusLocation | str, clip: CLIPInference | str, *, dim: int | None = None, index_type: str = "auto",
        root: str | Path | None = None, params: dict[str, Any] | None = None, checkpoint_path: str | Path | None = None,
        uploads: str = "uploads", max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, cache_dir: Path | None = None,
    ) -> MilvusImageIndex:
        """New collections for embeddings of `clip` (or model id + dim), bound to its checkpoint hash."""
        where = _location(where)
        if isinstance(clip, str):
            if dim is None:
                raise IndexStoreError("give dim= together with a model id")
            model_id, dim = clip, int(dim)
        else:
            model_id, dim = clip.model_id, int(clip.dim)
        client = connect(where)
        try:
            meta = new_collections(client, where, model_id=model_id, dim=dim, index_type=index_type, root=root,
                                   params=params, checkpoint_path=checkpoint_path, uploads=uploads,
                                   max_image_bytes=max_image_bytes)
        except BaseException:
            disconnect(client, where)
            raise
        return cls(where, client, meta, cache_dir=cache_dir)

    @classmethod
    def open(cls, where: MilvusLocation | str, model_id: str | None = None, *,
             cache_dir: Path | None = None) -> MilvusImageIndex:
        """Connect to an index; with model_id, refuse one built by another checkpoint."""
        where = _location(where)
        client = connect(where)
        try:
            meta = existing_collections(client, where)
            idx = cls(where, client, meta, cache_dir=cache_dir)
            if model_id is not None:
                idx.check_model(model_id)
        except BaseException:
            disconnect(client, where)
            raise
        return idx

    def close(self) -> None:
        """Disconnect (and stop an in-process Milvus Lite); the object is unusable afterwards."""
        disconnect(self._client, self.where)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ identity
    @property
    def model_id(self) -> str:
        return self._meta["model_id"]

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def index_type(self) -> str:
        return self._meta["index_type"]

    @property
    def root(self) -> Path | None:
        return Path(self._meta["root"]) if self._meta.get("root") else None

    @property
    def checkpoint_path(self) -> str | None:
        return self._meta.get("checkpoint_path")

    def __len__(self) -> int:
        with milvus_errors(self.where, "counting"):
            rows = self._client.query(self.where.collection, filter="", output_fields=["count(*)"],
                                      consistency_level=STRONG)
        return int(rows[0]["count(*)"])

    def check_model(self, clip: CLIPInference | str) -> None:
        """Refuse embeddings from another checkpoint: their vectors live in a different space."""
        model_id = clip if isinstance(clip, str) else clip.model_id
        if model_id != self.model_id:
            raise IndexMismatchError(
                f"index {self.where.text} was built with checkpoint {self.model_id[:12]}, not {str(model_id)[:12]}; "
                f"use that checkpoint or build another collection with `clipforge index build`"
            )
        if not isinstance(clip, str) and clip.dim != self.dim:
            raise IndexMismatchError(f"index holds {self.dim}-d embeddings but the model makes {clip.dim}-d ones")

    def info(self) -> dict[str, Any]:
        m = self._meta
        return {
            "path": self.where.text, "store": "milvus", "uri": self.where.uri, "collection": self.where.collection,
            "count": len(self), "index_type": m["index_type"], "requested_type": m["requested_type"],
            "params": dict(m["params"]), "dim": self.dim, "metric": m["metric"], "checkpoint_hash": self.model_id,
            "checkpoint_path": m.get("checkpoint_path"), "root": m.get("root"),
            "uploads": files_collection(self.where.collection), "max_image_bytes": m["max_image_bytes"],
            "tombstones": 0, "created": m["created"], "updated": (self.files.read_meta() or m)["updated"],
        }

    def reload_if_changed(self) -> bool:
        """Nothing to reload: every read goes to the shared collection."""
        return False

    # ------------------------------------------------------------------ reading
    def get(self, image_id: int) -> ImageRecord | None:
        row = self.rows.by_id([int(image_id)], _RECORD_FIELDS).get(int(image_id))
        return _record(row) if row is not None else None

    def records(self, offset: int = 0, limit: int = 100) -> list[ImageRecord]:
        """A page of records in id order (listing every id first: for maintenance, not per request)."""
        ids = sorted(int(r["id"]) for r in self.rows.scan("id >= 0", ["id"]))
        page = ids[max(0, int(offset)):max(0, int(offset)) + max(0, min(int(limit), 10_000))]
        rows = self.rows.by_id(page, _RECORD_FIELDS)
        return [_record(rows[i]) for i in page if i in rows]

    def resolve_path(self, image_id: int) -> Path:
        """A local file of the image: its stored bytes (cached here), else its file under a root this machine has."""
        row = self.rows.by_id([int(image_id)], _RECORD_FIELDS).get(int(image_id))
        if row is None:
            raise IndexStoreError(f"no image with id {image_id} in the index")
        if int(row["chunks"]):
            return self.files.cached_file(int(image_id), chunks=int(row["chunks"]), sha256=row["sha256"],
                                          stored_path=row["path"])
        if self.root is None:
            raise IndexStoreError(f"image {image_id} has no stored bytes and the index records no root")
        return resolve_inside(self.root, row["path"])

    def search_by_vector(
        self, vectors: np.ndarray, k: int, min_score: float | None = None, *, ef_search: int | None = None,
        nprobe: int | None = None, filter: SearchFilter | None = None,
    ) -> list[list[SearchResult]]:
        """The k most similar images for each query vector (rows of `vectors`), best first; nprobe is unused.

        filter keeps only images meeting its conditions, applied by Milvus before the k are chosen.
        """
        queries = unit_rows(vectors, self.dim)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise IndexStoreError(f"k must be a positive integer, got {k!r}")
        if k > QUERY_LIMIT:
            raise IndexStoreError(f"k must be at most {QUERY_LIMIT} on the Milvus store, got {k}")
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.index_type == "hnsw":
            params["params"] = {"ef": max(int(ef_search or self._meta["params"]["ef_search"]), int(k))}
        with milvus_errors(self.where, "searching"):
            found = self._client.search(
                self.where.collection, data=queries.tolist(), limit=int(k), filter=filter_expression(filter),
                output_fields=["path", "caption", "width", "height"], search_params=params, anns_field="vector",
                consistency_level=STRONG,
            )
        out = []
        for hits in found:
            row = []
            for hit in hits:
                score, entity = float(hit["distance"]), hit["entity"]
                if min_score is not None and score < min_score:
                    continue
                row.append(SearchResult(int(hit["id"]), score, entity["path"], entity.get("caption"),
                                        int(entity["width"]), int(entity["height"])))
            out.append(row)
        return out

    def search_text(self, clip: CLIPInference, text: str, k: int = 10, min_score: float | None = None,
                    filter: SearchFilter | None = None) -> list[SearchResult]:
        self.check_model(clip)
        return self.search_by_vector(clip.embed_texts([text]), k, min_score, filter=filter)[0]

    def search_image(self, clip: CLIPInference, image_source: ImageSource, k: int = 10,
                     min_score: float | None = None, filter: SearchFilter | None = None) -> list[SearchResult]:
        self.check_model(clip)
        return self.search_by_vector(clip.embed_images([image_source]), k, min_score, filter=filter)[0]

    def verify(self) -> dict[str, int]:
        """Check every row: id from its hash, a valid time, and all its byte chunks present."""
        return verify_rows(self.rows.scan("id >= 0", ["id", "sha256", "chunks", "added"]), self.files, self.where.text)

    # ------------------------------------------------------------------ writing
    def _ids_by_hash(self, hashes: Sequence[str]) -> dict[str, int]:
        rows = self.rows.by_id([content_id(h) for h in hashes], ["id", "sha256"])
        wanted = set(hashes)
        return {r["sha256"]: int(i) for i, r in rows.items() if r["sha256"] in wanted}

    def _add_target(self) -> AddTarget:
        return AddTarget(ids_by_hash=self._ids_by_hash, commit=self._commit_adds, size=self.__len__)

    def add_files(
        self, clip: CLIPInference, paths: Sequence[str | Path], captions: Sequence[str | None] | None = None, *,
        copy_outside_root: bool = False, batch_size: int = 64, workers: int | None = None, progress: bool = False,
        max_bytes: int | None = None, commit_every: int | None = None,
    ) -> AddReport:
        """Embed and add image files (their bytes are stored too); content already indexed is a duplicate."""
        self.check_model(clip)
        if self.root is None:
            raise IndexStoreError(f"index {self.where.text} records no root folder; add uploads instead of files")
        if captions is not None and len(captions) != len(paths):
            raise IndexStoreError(f"{len(captions)} captions for {len(paths)} files")
        files, failed = files_to_add(paths, captions, root=self.root, copy_outside_root=copy_outside_root)
        report = AddReport(failed=failed)
        options = EmbedOptions(batch_size=batch_size, workers=workers, progress=progress,
                               max_bytes=max_bytes, commit_every=commit_every or 2000)
        report.merge(ingest(clip, [f.source for f in files], pending_for=pending_files(files, self._meta["uploads"]),
                            target=self._add_target(), options=options))
        return report

    def add_bytes(
        self, clip: CLIPInference, items: Sequence[tuple[str, bytes, str | None]], *, max_bytes: int | None = None
    ) -> AddReport:
        """Add uploaded images (filename, content, caption): their bytes are stored in the collection."""
        self.check_model(clip)
        return ingest(
            clip, [content for _, content, _ in items], pending_for=pending_uploads(items, self._meta["uploads"]),
            target=self._add_target(), options=EmbedOptions(workers=0, max_bytes=max_bytes),
            names=[name for name, _, _ in items],
        )

    def add_embeddings(self, vectors: np.ndarray, images: Sequence[NewImage]) -> AddReport:
        """Add precomputed embeddings (from this index's checkpoint); a file found under the root is stored too."""
        vecs = unit_rows(vectors, self.dim) if len(images) else np.zeros((0, self.dim), np.float32)
        if len(vecs) != len(images):
            raise IndexStoreError(f"{len(vecs)} vectors for {len(images)} images")
        return self._commit_adds([PendingImage(im.path, im, v) for im, v in zip(images, vecs)])

    def _commit_adds(self, pending: list[PendingImage]) -> AddReport:
        known = self.rows.by_id([content_id(p.image.sha256) for p in pending], ["id", "sha256"])
        fresh, report = plan_adds(pending, {i: r["sha256"] for i, r in known.items()})
        rows, stored = [], []
        now = utc_timestamp()
        for p in fresh:
            data, refused = stored_content(p, self.root, self._meta["max_image_bytes"])
            if refused:
                report.failed.append((p.name, refused))
                continue
            rows.append(image_row(p, len(data) if data is not None else 0, now))
            if data is not None:
                stored.append((rows[-1]["id"], data))
                if len(stored) >= 64:
                    self.files.store(stored)
                    stored = []
        self.files.store(stored)  # bytes first: once a row is visible, so is its image
        replaced = self.rows.ids_at_paths([r["path"] for r in rows], exclude={r["id"] for r in rows})
        with milvus_errors(self.where, "adding images"):
            for start in range(0, len(rows), ROWS_PER_CALL):
                self._client.upsert(self.where.collection, rows[start:start + ROWS_PER_CALL])
        if replaced:
            self._delete(replaced)
        if rows:
            self._touch()
        report.added = [int(r["id"]) for r in rows]
        report.replaced = replaced
        return report

    def _delete(self, ids: Sequence[int]) -> None:
        with milvus_errors(self.where, "removing images"):
            for start in range(0, len(ids), ROWS_PER_CALL):
                self._client.delete(self.where.collection, ids=[int(i) for i in ids[start:start + ROWS_PER_CALL]])
        self.files.delete(ids)

    def _touch(self) -> None:
        self._meta = {**self._meta, "updated": utc_timestamp()}
        self.files.write_meta(self._meta)

    def remove(self, targets: Iterable[int | str | Path]) -> int:
        """Remove images by id, by path (relative to the root, or absolute inside it) or by folder; returns how many."""
        ids, paths = removal_targets(targets, self.root)
        found = set(self.rows.by_id(sorted(ids), ["id"]))
        for path in paths:
            exact = self.rows.ids_at_paths([path])
            if exact:
                found.update(exact)
                continue
            under = self.rows.scan(f"path like {like_literal(path + '/', prefix=True)}", ["id", "path"])
            found.update(int(r["id"]) for r in under if r["path"].startswith(path + "/"))
        if not found:
            return 0
        self._delete(sorted(found))
        self._touch()
        return len(found)
